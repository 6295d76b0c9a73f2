#!/bin/sh
# Outpost agent installer for Linux (x86_64, aarch64), served by the gateway at
# /install.sh:
#
#   curl -fsSL https://GATEWAY/install.sh | sudo sh -s -- --key KEY
#
# Downloads the static agent from the gateway that served this script, checks the
# release manifest's ed25519 signature with the Outpost release key built in below and
# the agent's SHA-256 against that signed manifest, installs it to /opt/outpost/bin,
# writes /etc/outpost/agent.toml and starts the outpost-agent service (systemd, OpenRC or
# SysV init) as the outpost system user, which it creates (--run-as root is the explicit
# alternative). Run it again to upgrade; --uninstall removes it. `sh install.sh --help`
# and docs/INSTALL.md say the rest. POSIX sh; passes `shellcheck -s sh`.

set -eu

# The gateway that served this script writes its own address here, and the two pins of
# its certificate: the SHA-256 of the certificate (what the agent pins) and curl's
# sha256// pin of its public key (what the downloads below pin). They are as trustworthy
# as the rest of this script, which is why it must be fetched over a verified connection.
served_gateway=''
served_pin=''
served_pubkey_pin=''

# The Outpost release verification key (installer/release-key.pub: ed25519, base64).
release_key='JImr34MDINdI95HoRvju703XZPcc9d2m29ek6gzLkZ8='

usage() {
	cat <<'EOF'
Usage: install.sh [options]            (as root)

  --key KEY          enrollment key of your tenant (env OUTPOST_KEY); needed the
                     first time. On a shared host prefer --key-file or the
                     environment: other users see command lines in ps
  --key-file FILE    read the enrollment key from FILE (its first line)
  --gateway HOST[:PORT]
                     the gateway (env OUTPOST_GATEWAY; https:// or wss:// prefixes
                     are accepted); default: the gateway that served this script,
                     else the one in an existing agent.toml
  --ca FILE          trust the gateway by this PEM CA file (env OUTPOST_CA)
  --pin PIN          trust the gateway by a pin it prints at start: pin_sha256
                     (hex, the certificate's SHA-256: what the agent checks) or
                     curl_pin (sha256//BASE64, its public key: what the downloads
                     check). One is enough when this script came from that gateway;
                     else give both (--pin twice; env OUTPOST_PIN, space-separated)
                     Neither --ca nor --pin: the system's root certificates.
  --release-key FILE verify the release's signature with this ed25519 public key
                     file instead of the Outpost key built in (env OUTPOST_RELEASE_KEY)
  --no-verify-release
                     do not check the release's signature (for hosts without
                     OpenSSL 3): the agent is then only checked against the
                     SHA256SUMS the gateway serves
  --version VERSION  install this agent version (env OUTPOST_VERSION); default latest
  --init SYSTEM      systemd, openrc, sysv or none (env OUTPOST_INIT); default: the
                     init system running here
  --run-as USER      outpost or root (env OUTPOST_RUN_AS): who the agent and every
                     plugin it runs are. Default: what the last run chose, else
                     outpost, a system user this script creates. root hands root on
                     this host to whoever controls its checks (docs/INSTALL.md)
  --uninstall        stop and remove the agent; keeps its identity (agent.finger,
                     agent.secret), its state and outbox, and checks.d
  --purge            with --uninstall: remove those too
  -h, --help         this text

OUTPOST_ROOT=DIR installs under DIR instead of / (for packaging and tests); the files
still name the real paths (/opt/outpost/..., /etc/outpost/...), and the outpost user
must exist in DIR/etc/passwd (no account is added to a directory tree).
EOF
}

say() { printf 'outpost: %s\n' "$*"; }
warn() { printf 'outpost: warning: %s\n' "$*" >&2; }
die() {
	printf 'outpost: error: %s\n' "$*" >&2
	exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

# ---------------------------------------------------------------- paths

# Real paths (written into agent.toml and the service files) ...
BIN=/opt/outpost/bin/outpost-agent
ETC=/etc/outpost
CONFIG=$ETC/agent.toml
CA_COPY=$ETC/ca.pem
STATE=/opt/outpost/state
PLUGINS=/opt/outpost/plugins
LOGS=/var/log/outpost
AGENT_LOG=$LOGS/agent.log
# Who the agent runs as, as the last run of this script chose it (root's file).
RUN_AS_FILE=$ETC/run-as
# The new binary waits here, in a directory only root may write to, until it is renamed
# into /opt/outpost/bin (which the agent's user owns: it updates itself).
STAGED=/opt/outpost/.outpost-agent.new
SYSTEMD_UNIT=/etc/systemd/system/outpost-agent.service
INITD_SCRIPT=/etc/init.d/outpost-agent
# ... and where they are on this filesystem.
r() { printf '%s%s' "$ROOT" "$1"; }

need_arg() {
	[ "$2" -ge 2 ] || die "$1 needs a value (see --help)"
}

# The first line of FILE, without surrounding blanks: an enrollment key kept out of the
# command line (which every local user can read in ps).
read_key_file() {
	[ -r "$1" ] || die "cannot read the key file \"$1\""
	opt_key=$(awk 'NR == 1 { gsub(/^[ \t\r]+|[ \t\r]+$/, ""); print; exit }' "$1")
	[ -n "$opt_key" ] || die "the key file \"$1\" is empty"
}

# Options from the command line, over the environment.
parse_args() {
	opt_key=${OUTPOST_KEY:-}
	opt_gateway=${OUTPOST_GATEWAY:-}
	opt_ca=${OUTPOST_CA:-}
	opt_pins=${OUTPOST_PIN:-}
	opt_release_key=${OUTPOST_RELEASE_KEY:-}
	no_verify=0
	opt_version=${OUTPOST_VERSION:-}
	opt_init=${OUTPOST_INIT:-}
	opt_run_as=${OUTPOST_RUN_AS:-}
	uninstall=0
	purge=0

	while [ $# -gt 0 ]; do
		case $1 in
		--key) need_arg "$1" $#; opt_key=$2; shift 2 ;;
		--key=*) opt_key=${1#*=}; shift ;;
		--key-file) need_arg "$1" $#; read_key_file "$2"; shift 2 ;;
		--key-file=*) read_key_file "${1#*=}"; shift ;;
		--gateway) need_arg "$1" $#; opt_gateway=$2; shift 2 ;;
		--gateway=*) opt_gateway=${1#*=}; shift ;;
		--ca) need_arg "$1" $#; opt_ca=$2; shift 2 ;;
		--ca=*) opt_ca=${1#*=}; shift ;;
		--pin) need_arg "$1" $#; opt_pins="$opt_pins $2"; shift 2 ;;
		--pin=*) opt_pins="$opt_pins ${1#*=}"; shift ;;
		--release-key) need_arg "$1" $#; opt_release_key=$2; shift 2 ;;
		--release-key=*) opt_release_key=${1#*=}; shift ;;
		--no-verify-release) no_verify=1; shift ;;
		--version) need_arg "$1" $#; opt_version=$2; shift 2 ;;
		--version=*) opt_version=${1#*=}; shift ;;
		--init) need_arg "$1" $#; opt_init=$2; shift 2 ;;
		--init=*) opt_init=${1#*=}; shift ;;
		--run-as) need_arg "$1" $#; opt_run_as=$2; shift 2 ;;
		--run-as=*) opt_run_as=${1#*=}; shift ;;
		--uninstall) uninstall=1; shift ;;
		--purge) purge=1; shift ;;
		-h | --help) usage; exit 0 ;;
		*) die "unknown option \"$1\" (see --help)" ;;
		esac
	done
}

# OUTPOST_ROOT, and that this is root on Linux.
check_host() {
	ROOT=${OUTPOST_ROOT:-}
	case $ROOT in
	'' | /*) ROOT=${ROOT%/} ;;
	*) die "OUTPOST_ROOT must be an absolute path, got \"$ROOT\"" ;;
	esac
	[ "$(uname -s)" = Linux ] || die "this installer is for Linux; on Windows use the MSI"
	[ "$(id -u)" = 0 ] || die "run this as root, e.g. curl -fsSL https://GATEWAY/install.sh | sudo sh -s -- --key KEY"
}

# ---------------------------------------------------------------- init systems

detect_init() {
	if [ -n "$opt_init" ]; then
		case $opt_init in
		systemd | openrc | sysv | none) printf '%s' "$opt_init" ;;
		*) die "--init must be systemd, openrc, sysv or none, got \"$opt_init\"" ;;
		esac
	elif [ -n "$ROOT" ]; then
		# Installing into a directory tree: the running system's init is not its init.
		printf none
	elif [ -d /run/systemd/system ] && have systemctl; then
		printf systemd
	elif [ -d /run/openrc ] && have rc-service; then
		printf openrc
	elif [ -r /proc/1/comm ] && [ "$(cat /proc/1/comm)" = init ] && [ -d /etc/init.d ]; then
		printf sysv
	else
		printf none
	fi
}

write_systemd_unit() {
	cat <<'EOF'
[Unit]
Description=Outpost monitoring agent
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
ExecStart=/opt/outpost/bin/outpost-agent run --config /etc/outpost/agent.toml
# SIGTERM makes the agent say bye to its gateway and flush its outbox.
KillSignal=SIGTERM
TimeoutStopSec=30
Restart=always
RestartSec=5
# 78 (EX_CONFIG): agent.toml is wrong; restarting will not help.
RestartPreventExitStatus=78
LimitNOFILE=65536

# Least privilege (docs/INSTALL.md): the agent and every plugin it runs are the outpost
# user, with one capability, CAP_NET_RAW, for ICMP checks (ambient, so that plugins have
# it too; packet capture stays out: no AF_PACKET sockets), no way to gain another
# (setuid and file capabilities do nothing here), and a read-only system except for the
# agent's own directories: /etc/outpost for its identity, /opt/outpost for its binary
# (self-update), state, outbox and plugins. /home is read-only rather than hidden, so
# that disk checks see the real file system there. System calls that only a capability
# not granted here could use fail with EPERM. Loosen one setting with
# `systemctl edit outpost-agent`; install.sh --run-as root replaces this paragraph.
User=outpost
Group=outpost
AmbientCapabilities=CAP_NET_RAW
CapabilityBoundingSet=CAP_NET_RAW
NoNewPrivileges=yes
RestrictSUIDSGID=yes
ProtectSystem=strict
ReadWritePaths=/etc/outpost /opt/outpost
ProtectHome=read-only
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
LockPersonality=yes
SystemCallFilter=~@module @mount @obsolete @raw-io @reboot @swap
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
EOF
}

write_openrc_script() {
	cat <<'EOF'
#!/sbin/openrc-run
# Outpost monitoring agent (OpenRC), installed by install.sh.
# openrc-run reads these variables:
# shellcheck disable=SC2034

description="Outpost monitoring agent"
command=/opt/outpost/bin/outpost-agent
command_args="run --config /etc/outpost/agent.toml"
# The agent and every plugin it runs are this user (docs/INSTALL.md); install.sh
# --run-as root removes this line.
command_user="outpost:outpost"
supervisor=supervise-daemon
respawn_delay=5
output_log=/var/log/outpost/agent.log
error_log=/var/log/outpost/agent.log
retry="TERM/30/KILL/5"

depend() {
	need net
	after firewall
}

start_pre() {
	# supervise-daemon opens the log as command_user, in a directory only root may
	# write to.
	checkpath -d -m 0755 -o root:root /var/log/outpost
	checkpath -f -m 0640 -o "${command_user:-root:root}" "$output_log"
}
EOF
}

write_sysv_script() {
	cat <<'EOF'
#!/bin/sh
### BEGIN INIT INFO
# Provides:          outpost-agent
# Required-Start:    $network $remote_fs
# Required-Stop:     $network $remote_fs
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: Outpost monitoring agent
### END INIT INFO
# chkconfig: 2345 90 10
# description: Outpost monitoring agent

BIN=/opt/outpost/bin/outpost-agent
CONFIG=/etc/outpost/agent.toml
PIDFILE=/var/run/outpost-agent.pid
LOG=/var/log/outpost/agent.log
# Who the agent and every plugin it runs are (docs/INSTALL.md); install.sh --run-as
# root makes it root.
RUN_AS=outpost

running() {
	[ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null
}

start() {
	if running; then
		echo "outpost-agent is already running"
		return 0
	fi
	# Opened here, as root, in a directory only root may write to.
	mkdir -p /var/log/outpost
	# Each way below runs the agent in the process started here (exec), so that $! is
	# its pid.
	if [ "$RUN_AS" = root ]; then
		nohup "$BIN" run --config "$CONFIG" >>"$LOG" 2>&1 </dev/null &
	elif command -v start-stop-daemon >/dev/null 2>&1; then
		nohup start-stop-daemon --start --chuid "$RUN_AS" --exec "$BIN" -- run --config "$CONFIG" >>"$LOG" 2>&1 </dev/null &
	elif command -v setpriv >/dev/null 2>&1; then
		nohup setpriv --reuid="$RUN_AS" --regid="$(id -g "$RUN_AS")" --init-groups "$BIN" run --config "$CONFIG" >>"$LOG" 2>&1 </dev/null &
	else
		echo "cannot start outpost-agent as $RUN_AS: neither start-stop-daemon nor setpriv (util-linux) is installed"
		return 1
	fi
	echo $! >"$PIDFILE"
	echo "outpost-agent started"
}

stop() {
	if ! running; then
		rm -f "$PIDFILE"
		echo "outpost-agent is not running"
		return 0
	fi
	pid=$(cat "$PIDFILE")
	# SIGTERM: the agent says bye and flushes its outbox; KILL after 30 s.
	kill -TERM "$pid"
	i=0
	while kill -0 "$pid" 2>/dev/null && [ $i -lt 30 ]; do
		sleep 1
		i=$((i + 1))
	done
	kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
	rm -f "$PIDFILE"
	echo "outpost-agent stopped"
}

case "$1" in
start) start ;;
stop) stop ;;
restart | force-reload) stop; start ;;
status)
	if running; then echo "outpost-agent is running"; else echo "outpost-agent is not running"; exit 3; fi
	;;
*) echo "Usage: $0 {start|stop|restart|status}"; exit 2 ;;
esac
EOF
}

# The service files above, for the user chosen: as they are for outpost; for root (an
# explicit --run-as root), without what makes the agent that user (and, under systemd,
# without the sandbox, which would leave root nothing root is wanted for).
as_run_as() {
	if [ "$run_as" = outpost ]; then
		cat
		return
	fi
	note='# install.sh --run-as root: the agent and every plugin it runs are root (docs/INSTALL.md).'
	awk -v note="$note" '
		skip && (/^$/ || /^command_user=/) { skip = 0; if (!/^$/) next }
		skip { next }
		/^# Least privilege/ || /^# The agent and every plugin it runs are this user/ { skip = 1; print note; next }
		/^RUN_AS=outpost$/ { print "RUN_AS=root"; next }
		{ print }'
}

# Install the service files of INIT and (re)start the agent under it.
start_service() {
	case $1 in
	systemd)
		write_systemd_unit | as_run_as >"$(r "$SYSTEMD_UNIT")"
		chmod 0644 "$(r "$SYSTEMD_UNIT")"
		systemctl daemon-reload
		systemctl enable outpost-agent.service
		systemctl restart outpost-agent.service
		say "started the outpost-agent service (systemd); logs: journalctl -u outpost-agent"
		;;
	openrc)
		write_openrc_script | as_run_as >"$(r "$INITD_SCRIPT")"
		chmod 0755 "$(r "$INITD_SCRIPT")"
		rc-update add outpost-agent default
		rc-service outpost-agent restart
		say "started the outpost-agent service (OpenRC); logs: $LOGS/agent.log"
		;;
	sysv)
		write_sysv_script | as_run_as >"$(r "$INITD_SCRIPT")"
		chmod 0755 "$(r "$INITD_SCRIPT")"
		if have update-rc.d; then
			update-rc.d outpost-agent defaults
		elif have chkconfig; then
			chkconfig --add outpost-agent
		else
			warn "neither update-rc.d nor chkconfig found: link $INITD_SCRIPT into your runlevels to start the agent at boot"
		fi
		if have service; then
			service outpost-agent restart
		else
			"$(r "$INITD_SCRIPT")" restart
		fi
		say "started the outpost-agent service (SysV init); logs: $LOGS/agent.log"
		;;
	none)
		say "no init system is running here (no systemd, OpenRC or SysV init found), so no service was set up."
		if [ "$run_as" = root ]; then
			say "Start the agent yourself, as root:"
		else
			say "Start the agent yourself, as root (the command makes it the outpost user):"
		fi
		printf '\n    %s\n\n' "$(start_command)"
		say "(it logs to stderr; e.g. append  >>$AGENT_LOG 2>&1 &  to run it in the background)"
		;;
	esac
}

# Stop the agent under INIT and remove every service file this script may have written.
stop_service() {
	case $1 in
	systemd)
		systemctl disable --now outpost-agent.service || warn "systemctl could not stop outpost-agent"
		;;
	openrc)
		rc-service outpost-agent stop || warn "rc-service could not stop outpost-agent"
		rc-update del outpost-agent default || true
		;;
	sysv)
		if have service; then
			service outpost-agent stop || warn "could not stop outpost-agent"
		elif [ -x "$(r "$INITD_SCRIPT")" ]; then
			"$(r "$INITD_SCRIPT")" stop || warn "could not stop outpost-agent"
		fi
		if have update-rc.d; then
			update-rc.d -f outpost-agent remove || true
		elif have chkconfig; then
			chkconfig --del outpost-agent || true
		fi
		;;
	none) say "no init system here: if you started the agent yourself, stop it yourself (SIGTERM)" ;;
	esac
	if [ -f "$(r "$SYSTEMD_UNIT")" ]; then
		rm -f "$(r "$SYSTEMD_UNIT")"
		[ "$1" = systemd ] && systemctl daemon-reload
	fi
	rm -f "$(r "$INITD_SCRIPT")"
}

# ---------------------------------------------------------------- the agent's user

# "UID GID" of account $1: from the root's /etc/passwd (a directory tree has nothing
# else), else, on this host, from the name service; nothing if there is no such account.
account() {
	ids=$(awk -F: -v u="$1" '$1 == u { print $3 " " $4; exit }' "$(r /etc/passwd)" 2>/dev/null) || ids=''
	if [ -z "$ids" ] && [ -z "$ROOT" ] && id -u "$1" >/dev/null 2>&1; then
		ids="$(id -u "$1") $(id -g "$1")"
	fi
	printf '%s' "$ids"
}

# The name of group $1 (a number), else the number.
group_name() {
	name=$(awk -F: -v g="$1" '$3 == g { print $1; exit }' "$(r /etc/group)" 2>/dev/null) || name=''
	printf '%s' "${name:-$1}"
}

group_exists() {
	grep -q "^$1:" /etc/group 2>/dev/null || { have getent && getent group "$1" >/dev/null 2>&1; }
}

# Whether PATH is owned by uid $1 (not following a symbolic link).
owned_by() {
	[ -n "$(find "$2" -prune -user "$1" 2>/dev/null)" ]
}

# Who the agent runs as: --run-as, else the choice the last run recorded (in a file only
# root can have written), else outpost. In a directory tree the account must exist there.
decide_user() {
	run_as=$opt_run_as
	recorded=''
	if [ -n "$(find "$(r "$RUN_AS_FILE")" -prune -type f -user 0 2>/dev/null)" ]; then
		recorded=$(head -n 1 "$(r "$RUN_AS_FILE")")
		case $recorded in
		outpost | root) ;;
		*) warn "ignoring $RUN_AS_FILE, which names neither outpost nor root"; recorded='' ;;
		esac
	fi
	[ -n "$run_as" ] || run_as=${recorded:-outpost}
	case $run_as in
	outpost | root) ;;
	*) die "--run-as must be outpost or root, got \"$run_as\"" ;;
	esac
	if [ "$run_as" = outpost ] && [ -n "$ROOT" ] && [ -z "$(account outpost)" ]; then
		die "there is no outpost user in $ROOT/etc/passwd: installing into a directory tree (OUTPOST_ROOT) uses its accounts and adds none. Create it there first (e.g. useradd --root $ROOT --system --user-group --home-dir $STATE --no-create-home --shell /usr/sbin/nologin outpost), or pass --run-as root"
	fi
}

# The outpost system user and group, made unless they exist: no password, no login
# shell, its home the state directory (not created here).
create_user() {
	shell=/usr/sbin/nologin
	[ -x "$shell" ] || shell=/sbin/nologin
	[ -x "$shell" ] || shell=/bin/false
	if have useradd; then
		if group_exists outpost; then
			set -- --gid outpost
		else
			set -- --user-group
		fi
		useradd --system "$@" --home-dir "$STATE" --no-create-home --shell "$shell" --comment 'Outpost monitoring agent' outpost ||
			die "useradd could not create the outpost user; create a system user outpost yourself and run this again, or pass --run-as root"
	elif have adduser; then
		# BusyBox (Alpine); Debian's adduser is never reached, useradd is always there.
		group_exists outpost || addgroup -S outpost ||
			die "addgroup could not create the outpost group; create it yourself and run this again, or pass --run-as root"
		adduser -S -D -H -h "$STATE" -s "$shell" -G outpost -g 'Outpost monitoring agent' outpost ||
			die "adduser could not create the outpost user; create a system user outpost yourself and run this again, or pass --run-as root"
	else
		die "cannot create the outpost user: neither useradd nor adduser is installed. Create a system user outpost yourself and run this again, or pass --run-as root"
	fi
}

# uid, gid and group name the agent runs as; makes the outpost user if there is none.
ensure_user() {
	if [ "$run_as" = root ]; then
		uid=0
		gid=0
	else
		ids=$(account outpost)
		if [ -z "$ids" ]; then
			create_user
			ids=$(account outpost)
			[ -n "$ids" ] || die "the outpost user was created but cannot be found; run this again"
			say "created the system user outpost (uid ${ids% *}), which the agent and its plugins run as"
		fi
		uid=${ids% *}
		gid=${ids#* }
		case $uid$gid in
		'' | *[!0-9]*) die "cannot tell the uid and gid of the outpost user (got \"$ids\")" ;;
		esac
		[ "$uid" != 0 ] || die "the outpost user has uid 0, which is root: give it a uid of its own, or pass --run-as root"
	fi
	group=$(group_name "$gid")
}

# The command that starts the agent as its user, for a host without an init system: one
# that replaces itself with the agent (its pid is the agent's) where there is one.
start_command() {
	run="$BIN run --config $CONFIG"
	if [ "$run_as" = root ]; then
		printf '%s' "$run"
	elif have setpriv; then
		printf 'setpriv --reuid=%s --regid=%s --init-groups %s' outpost "$group" "$run"
	elif have runuser; then
		printf 'runuser -u %s -- %s' outpost "$run"
	else
		printf "su -s /bin/sh -c '%s' %s" "$run" outpost
	fi
}

# Stop the agent, which still runs as its former user, before its files change hands
# (what it writes after that would stay that user's).
stop_for_handover() {
	case $1 in
	systemd) systemctl stop outpost-agent.service || true ;;
	openrc) rc-service outpost-agent stop || true ;;
	sysv)
		if have service; then
			service outpost-agent stop || true
		elif [ -x "$(r "$INITD_SCRIPT")" ]; then
			"$(r "$INITD_SCRIPT")" stop || true
		fi
		;;
	none) warn "if you started the agent yourself, stop it now: it runs as its former user; start it again as shown below" ;;
	esac
}

# A path root manages inside /etc/outpost, where the agent's user may add names: one the
# agent planted as a symbolic link (say to /etc/shadow) must not be followed as root.
refuse_links() {
	for p in "$(r "$CONFIG")" "$(r "$CONFIG").old" "$(r "$CA_COPY")" "$(r "$RUN_AS_FILE")" "$(r "$ETC/checks.d")"; do
		[ ! -L "$p" ] || die "$p is a symbolic link, which this script does not follow as root: remove it and run this again"
	done
}

# ---------------------------------------------------------------- uninstall

uninstall_agent() {
	init=$(detect_init)
	stop_service "$init"
	# What self-updates leave beside the binary goes with it.
	rm -f "$(r "$BIN")" "$(r "$BIN").previous" "$(r /opt/outpost/bin/.outpost-agent.new)" "$(r "$STAGED")"
	rm -f "$(r "$CONFIG")" "$(r "$CONFIG").old" "$(r "$CA_COPY")" "$(r "$RUN_AS_FILE")"
	rm -rf "$(r "$PLUGINS")" "$(r "$LOGS")"
	if [ "$purge" = 1 ]; then
		rm -rf "$(r "$ETC")" "$(r /opt/outpost)"
		say "removed the agent, its configuration, identity, state and outbox"
		if [ -n "$(account outpost)" ]; then
			say "kept the outpost user and group (files elsewhere may still be theirs); userdel outpost removes them"
		fi
	else
		# What is left is what the agent made: identity, state, outbox, dropped-in checks.
		for d in "$(r /opt/outpost/bin)" "$(r "$STATE")" "$(r "$ETC/checks.d")" "$(r "$ETC")" "$(r /opt/outpost)"; do
			rmdir "$d" 2>/dev/null || true
		done
		if [ -e "$(r "$ETC")" ] || [ -e "$(r /opt/outpost)" ]; then
			say "removed the agent; kept its identity and state (what is left of $ETC and /opt/outpost); --uninstall --purge removes them too"
		else
			say "removed the agent"
		fi
	fi
}

# ---------------------------------------------------------------- what to install

# Value of a top-level string KEY in the existing agent.toml, if any.
config_value() {
	[ -f "$(r "$CONFIG")" ] || return 0
	awk -v k="$1" '
		/^[ \t]*\[/ { exit }
		$0 ~ "^[ \t]*" k "[ \t]*=" {
			sub(/^[^=]*=[ \t]*"/, ""); sub(/"[ \t]*(#.*)?$/, ""); print; exit
		}' "$(r "$CONFIG")"
}

sha256_of() {
	if have sha256sum; then
		sha256sum "$1" | awk '{ print $1 }'
	elif have shasum; then
		shasum -a 256 "$1" | awk '{ print $1 }'
	elif have openssl; then
		openssl dgst -sha256 -r "$1" | awk '{ print $1 }'
	else
		die "cannot verify downloads: none of sha256sum, shasum or openssl is installed"
	fi
}

# fetch PATH DEST MAX [HINT]: download $base/PATH into DEST (at most MAX bytes, with
# curl), with the gateway trusted as decided; HINT follows the message of a 404.
fetch() {
	path=$1
	url=$base/$1
	dest=$2
	max=$3
	hint=${4:-}
	case $downloader in
	curl)
		set -- -gsS --proto =https --connect-timeout 15 --max-time 600 --retry 2 --max-filesize "$max" -o "$dest" -w '%{http_code}\n'
		rc=0
		if [ -n "$pin" ]; then
			# The pinned public key replaces chain and name validation, as the pin does in
			# the agent: -k turns those off, --pinnedpubkey still makes curl refuse, in the
			# handshake and before any data, a server whose certificate holds another key
			# (curl documents this; every curl that takes sha256// pins, 7.44 or newer, does it).
			curl "$@" -k --pinnedpubkey "$pubkey_pin" "$url" >"$tmp/curl.out" 2>"$tmp/curl.err" || rc=$?
		elif [ -n "$ca" ]; then
			curl "$@" --cacert "$ca" "$url" >"$tmp/curl.out" 2>"$tmp/curl.err" || rc=$?
		else
			curl "$@" "$url" >"$tmp/curl.out" 2>"$tmp/curl.err" || rc=$?
		fi
		case $rc in
		0) ;;
		6) die "cannot resolve the gateway's name in $url: check --gateway" ;;
		7 | 28) die "cannot reach the gateway at $url (is it running, and is its port open?): $(cat "$tmp/curl.err")" ;;
		90) die "the server at $url is not the pinned gateway: its public key does not match $pubkey_pin (nothing was installed)" ;;
		2 | 4 | 48)
			[ -z "$pin" ] || die "this curl cannot pin a public key (--pinnedpubkey sha256// needs curl 7.44 or newer, built with OpenSSL, GnuTLS, wolfSSL or mbedTLS): upgrade curl or trust the gateway with --ca FILE: $(cat "$tmp/curl.err")"
			die "downloading $url failed (curl exit $rc): $(cat "$tmp/curl.err")" ;;
		35 | 51 | 53 | 54 | 58 | 59 | 60 | 77 | 80 | 83 | 91)
			die "cannot verify the gateway's certificate at $url: pass --ca FILE or --pin PIN (docs/INSTALL.md): $(cat "$tmp/curl.err")" ;;
		63) die "$url is larger than the $max bytes it may have" ;;
		*) die "downloading $url failed (curl exit $rc): $(cat "$tmp/curl.err")" ;;
		esac
		code=$(head -n 1 "$tmp/curl.out")
		case $code in
		200) ;;
		404) die "the gateway has no $path ($url answered 404: $(head -c 300 "$dest"))$hint" ;;
		*) die "$url answered HTTP $code" ;;
		esac
		;;
	wget)
		rc=0
		if [ -n "$ca" ]; then
			wget -q -T 30 -t 2 --ca-certificate="$ca" -O "$dest" "$url" 2>"$tmp/wget.err" || rc=$?
		else
			wget -q -T 30 -t 2 -O "$dest" "$url" 2>"$tmp/wget.err" || rc=$?
		fi
		case $rc in
		0) ;;
		4) die "cannot reach the gateway at $url: $(cat "$tmp/wget.err")" ;;
		5) die "cannot verify the gateway's certificate at $url: pass --ca FILE (docs/INSTALL.md)" ;;
		8) die "the gateway has no $path ($url answered an error)$hint" ;;
		*) die "downloading $url failed (wget exit $rc): $(cat "$tmp/wget.err")" ;;
		esac
		[ "$(wc -c <"$dest" | tr -d " ")" -le "$max" ] || die "$url is larger than the $max bytes it may have"
		;;
	esac
}

# Whether $1 is base64 of 32 bytes (a SHA-256, an ed25519 key): 43 characters and "=".
is_b64_32() {
	[ ${#1} = 44 ] || return 1
	case $1 in
	*[!A-Za-z0-9+/=]* | *=*=) return 1 ;;
	*[A-Za-z0-9+/]=) return 0 ;;
	*) return 1 ;;
	esac
}

# The pins given (--pin, OUTPOST_PIN): at most one of each form, into opt_pin (hex
# pin_sha256, lower case, no colons) and opt_pubkey_pin (sha256//BASE64).
parse_pins() {
	opt_pin=''
	opt_pubkey_pin=''
	pins=$(printf '%s' "$opt_pins" | tr ',' ' ')
	set -f
	# shellcheck disable=SC2086 # split on spaces and commas, without globbing
	set -- $pins
	set +f
	for p in "$@"; do
		case $p in
		sha256//*)
			is_b64_32 "${p#sha256//}" || die "--pin \"$p\" is not a public-key pin: curl_pin is sha256// and 44 base64 characters"
			[ -z "$opt_pubkey_pin" ] || [ "$opt_pubkey_pin" = "$p" ] || die "two different public-key pins given (--pin): give one"
			opt_pubkey_pin=$p
			;;
		*)
			h=$(printf '%s' "$p" | tr -d ':' | tr 'A-F' 'a-f')
			case $h in
			*[!0-9a-f]*) h=x ;;
			esac
			[ ${#h} = 64 ] || die "--pin must be 64 hex digits (the gateway prints it as pin_sha256) or sha256//BASE64 (curl_pin), got \"$p\""
			[ -z "$opt_pin" ] || [ "$opt_pin" = "$h" ] || die "two different certificate pins given (--pin): give one"
			opt_pin=$h
			;;
		esac
	done
}

# decide_pins PIN PUBKEY_PIN (either may be empty): both pins of the gateway to trust,
# completed from this script's own gateway or agent.toml, into pin (the certificate's, what
# the agent checks) and pubkey_pin (its public key's, what curl checks).
decide_pins() {
	pin=$1
	pubkey_pin=$2
	if [ -z "$pin" ]; then
		if [ "$pubkey_pin" = "$served_pubkey_pin" ]; then
			# The certificate of the gateway that served this script holds that key.
			pin=$served_pin
		else
			pin=$(config_value pin_sha256)
			[ -n "$pin" ] || die "the agent pins the gateway's certificate, not its key: pass its pin_sha256 as well (--pin HEX; the gateway prints both at start)"
		fi
	fi
	if [ -z "$pubkey_pin" ]; then
		[ "$pin" = "$served_pin" ] || die "certificate pin $pin is not the pin of the gateway that served this script, so the public key to pin the downloads to is unknown: pass that gateway's curl_pin as well (--pin sha256//BASE64; the gateway prints both at start); nothing was installed"
		pubkey_pin=$served_pubkey_pin
	fi
	if [ -n "$served_pin" ] && { [ "$pin" = "$served_pin" ] || [ "$pubkey_pin" = "$served_pubkey_pin" ]; }; then
		if [ "$pin" != "$served_pin" ] || [ "$pubkey_pin" != "$served_pubkey_pin" ]; then
			die "the two pins given are not of one certificate: those of the gateway that served this script are $served_pin and $served_pubkey_pin"
		fi
	fi
}

# The build for this machine, the gateway, how to trust it, and how to download.
decide() {
	refuse_links
	case $(uname -m) in
	x86_64 | amd64) target=x86_64-unknown-linux-musl ;;
	aarch64 | arm64) target=aarch64-unknown-linux-musl ;;
	*) die "unsupported architecture \"$(uname -m)\": Outpost ships Linux agents for x86_64 and aarch64 only" ;;
	esac
	artifact=outpost-agent-$target

	gateway=${opt_gateway:-$served_gateway}
	[ -n "$gateway" ] || gateway=$(config_value gateway_url)
	gateway=${gateway#https://}
	gateway=${gateway#wss://}
	gateway=${gateway%/}
	[ -n "$gateway" ] || die "which gateway? Pass --gateway HOST[:PORT] (or set OUTPOST_GATEWAY)"
	case $gateway in
	*[!A-Za-z0-9.:\[\]-]* | [.:-]*) die "gateway \"$gateway\" is not a HOST[:PORT]" ;;
	esac

	parse_pins
	[ -z "$opt_ca" ] || [ -z "$opt_pin$opt_pubkey_pin" ] || die "give either --ca or --pin, not both"
	if [ -n "$opt_ca" ]; then
		[ -r "$opt_ca" ] || die "cannot read the CA file \"$opt_ca\""
		grep -q -- '-----BEGIN CERTIFICATE-----' "$opt_ca" || die "CA file \"$opt_ca\" holds no PEM certificate"
	fi
	case $opt_key in
	*[!A-Za-z0-9._-]*) die "the enrollment key may hold only letters, digits, '.', '_' and '-'" ;;
	esac
	[ ${#opt_key} -le 256 ] || die "the enrollment key is longer than 256 characters"
	[ -f "$(r "$CONFIG")" ] || [ -n "$opt_key" ] || die "the first install needs an enrollment key: pass --key KEY (or set OUTPOST_KEY)"
	decide_user

	# How downloads trust the gateway: the options, else what agent.toml says, else the system.
	ca=$opt_ca
	pin=''
	pubkey_pin=''
	if [ -n "$opt_pin$opt_pubkey_pin" ]; then
		decide_pins "$opt_pin" "$opt_pubkey_pin"
		# What agent.toml gets (the pin given, or the one found for the key given).
		opt_pin=$pin
	elif [ -z "$ca" ]; then
		if [ -n "$(config_value pin_sha256)" ]; then
			decide_pins "$(config_value pin_sha256)" ''
		elif [ -n "$(config_value ca_file)" ]; then
			ca=$(r "$(config_value ca_file)")
		fi
	fi

	if have curl; then
		downloader=curl
	elif have wget; then
		downloader=wget
		[ -z "$pin" ] || die "--pin needs curl (7.44 or newer; wget cannot pin a key here): install curl or trust the gateway with --ca FILE"
	else
		die "neither curl nor wget is installed; install one of them and run this again"
	fi
	base=https://$gateway

	# How the release is verified: its signature, with the built-in key or --release-key.
	if [ "$no_verify" = 0 ]; then
		key=$release_key
		if [ -n "$opt_release_key" ]; then
			[ -r "$opt_release_key" ] || die "cannot read the release key file \"$opt_release_key\""
			key=$(awk '/^[ \t\r]*(#|$)/ { next } { gsub(/[ \t\r]/, ""); print; exit }' "$opt_release_key")
		fi
		is_b64_32 "$key" || die "release key file \"$opt_release_key\" holds no ed25519 public key (one line of base64, as outpost-gateway release keygen writes it)"
		have openssl || die "cannot check the release's signature: openssl (OpenSSL 3.0 or newer) is not installed. Install it (apt-get install openssl, dnf install openssl, apk add openssl) and run this again, or pass --no-verify-release to rely on the connection to the gateway and its SHA256SUMS alone (docs/INSTALL.md)"
	fi
}

# openssl verifies the ed25519 signature $3 (64 bytes) of file $2 with the public key $1 (PEM).
verify_ed25519() {
	openssl pkeyutl -verify -pubin -inkey "$1" -rawin -in "$2" -sigfile "$3" >/dev/null 2>&1
}

# The release key as openssl reads it, and proof that this openssl can verify ed25519 at
# all (a good signature from RFC 8032, test 2), so that a failure later means a bad one.
prepare_verify() {
	# A SubjectPublicKeyInfo for ed25519 is 12 fixed bytes (16 base64 characters) and the key.
	printf '%s\n' '-----BEGIN PUBLIC KEY-----' "MCowBQYDK2VwAyEA$key" '-----END PUBLIC KEY-----' >"$tmp/release-key.pem"
	printf '%s\n' '-----BEGIN PUBLIC KEY-----' 'MCowBQYDK2VwAyEAPUAXw+hDiVqStwqnTRt+vJyYLM8uxJaMwM1V8Sr0Zgw=' '-----END PUBLIC KEY-----' >"$tmp/rfc8032.pem"
	printf r >"$tmp/rfc8032.msg"
	printf '%s' 'kqAJqfDUyrhyDoILX2QlQKKye1QWUD+Ps3YiI+vbadoIWsHkPhWZbkWPNhPQ8R2MOHsurrQwKu6wDSkWErsMAA==' |
		openssl base64 -d -A >"$tmp/rfc8032.sig" 2>/dev/null || true
	verify_ed25519 "$tmp/rfc8032.pem" "$tmp/rfc8032.msg" "$tmp/rfc8032.sig" ||
		die "this openssl ($(openssl version 2>&1 | head -n 1)) cannot verify ed25519 signatures: OpenSSL 3.0 or newer is needed. Upgrade it, or pass --no-verify-release to rely on the connection to the gateway and its SHA256SUMS alone (docs/INSTALL.md)"
	openssl pkey -pubin -in "$tmp/release-key.pem" -noout >/dev/null 2>&1 ||
		die "the release key ${opt_release_key:-built into this script} is not an ed25519 public key"
}

# The releases of a manifest, checked the way the agent checks them (protocol/src/update.rs),
# for TARGET: "= VERSION FILE SIZE SHA256" of WANT (a version, or empty: the highest), else
# "? VERSION..." listing what there is; "! REASON" when an entry is not valid. The manifest
# is JSON ({"releases": [{"version", "target", "file", "size", "sha256"}, ...]}): this walks
# its tokens, so it depends on neither layout nor order.
manifest_select() {
	awk -v target="$2" -v want="$3" '
	function fail(why) { print "! " why; failed = 1; exit 1 }
	function vkey(v,   p, n, k, i) {
		n = split(v, p, ".")
		k = ""
		for (i = 1; i <= 4; i++) k = k sprintf("%09d", i <= n ? p[i] : 0)
		return k
	}
	function field(name) {
		if (!(name in f)) fail("a release has no \"" name "\"")
		if ((name == "size") == isstr[name]) fail("a release has a \"" name "\" of the wrong type")
		return f[name]
	}
	function release(   v, t, fl, sz, h, p, n, i) {
		v = field("version"); t = field("target"); fl = field("file"); sz = field("size"); h = field("sha256")
		n = split(v, p, ".")
		if (v == "" || length(v) > 32 || n > 4 || v ~ /[^0-9.]/) fail("version \"" v "\" is not one to four numbers")
		for (i = 1; i <= n; i++) if (p[i] == "" || length(p[i]) > 9) fail("version \"" v "\" is not one to four numbers")
		if (t == "" || length(t) > 64 || t ~ /[^a-z0-9_-]/ || index(t, "-") == 0) fail("target \"" t "\" is not a target triple")
		if (fl == "" || length(fl) > 128 || fl ~ /[^A-Za-z0-9._-]/ || substr(fl, 1, 1) == ".") fail("file name \"" fl "\" is not allowed")
		if (sz !~ /^[0-9]+$/ || length(sz) > 10 || sz + 0 < 1 || sz + 0 > 268435456) fail("size " sz " is out of range")
		if (length(h) != 64 || h ~ /[^0-9a-f]/) fail("sha256 \"" h "\" is not 64 lowercase hex digits")
		if (t != target) return
		have = have " " v
		if (want != "") {
			if (best == "" && vkey(v) == vkey(want)) { best = v; pick = v " " fl " " sz " " h }
		} else if (best == "" || vkey(v) > vkey(best)) {
			best = v; pick = v " " fl " " sz " " h
		}
	}
	# JSON strings hold no line breaks, so the text is scanned a line at a time.
	{
		text = $0; n = length(text); i = 1
		while (i <= n) {
			c = substr(text, i, 1)
			if (c == " " || c == "\t" || c == "\r" || c == ":") { i++; continue }
			if (c == ",") { if (type[d] == "o") wantkey[d] = 1; i++; continue }
			if (c == "{" || c == "[") {
				d++; type[d] = c == "{" ? "o" : "a"; wantkey[d] = c == "{"; key[d] = ""
				if (d == 3 && type[3] == "o" && type[2] == "a" && type[1] == "o" && key[1] == "releases") {
					inrel = 1; split("", f); split("", isstr)
				}
				i++; continue
			}
			if (c == "}" || c == "]") {
				if (d == 3 && inrel) { release(); inrel = 0 }
				if (d == 0) fail("the manifest is not JSON")
				d--; i++; continue
			}
			if (c == "\"") {
				j = i + 1; s = ""
				while (j <= n && (ch = substr(text, j, 1)) != "\"") {
					if (ch == "\\") { s = s ch substr(text, j + 1, 1); j += 2 } else { s = s ch; j++ }
				}
				if (j > n) fail("the manifest is not JSON")
				tok = s; str = 1; i = j + 1
			} else {
				j = i
				while (j <= n && index(" \t\r,:]}", substr(text, j, 1)) == 0) j++
				tok = substr(text, i, j - i); str = 0; i = j
			}
			if (d == 0) fail("the manifest is not JSON")
			if (type[d] == "o" && wantkey[d]) { key[d] = tok; wantkey[d] = 0; continue }
			if (d == 3 && inrel) { f[key[3]] = tok; isstr[key[3]] = str }
		}
	}
	END {
		if (failed) exit 1
		if (d != 0) fail("the manifest is not JSON")
		if (pick != "") print "= " pick
		else print "?" have
	}' "$1"
}

# Download the release into $tmp and verify it; nothing on the host changes here.
download() {
	if [ "$no_verify" = 1 ]; then
		download_unverified
		return
	fi
	prepare_verify
	version=${opt_version:-}
	case $version in
	latest) version='' ;;
	'') ;;
	*[!0-9.]* | .* | *. | *..*) die "\"$version\" is not a version (one to four dot-separated numbers, e.g. 1.2.0)" ;;
	esac

	# Nothing in the manifest is read before its signature verifies.
	publish_hint=': releases are published with outpost-gateway release publish (docs/UPDATES.md)'
	fetch releases/manifest.json "$tmp/manifest.json" 1048576 "$publish_hint"
	fetch releases/manifest.json.sig "$tmp/manifest.json.sig" 1024 "$publish_hint"
	sig=$(tr -d ' \t\r\n' <"$tmp/manifest.json.sig")
	case $sig in
	'' | *[!A-Za-z0-9+/=]*) die "releases/manifest.json.sig is not a signature (base64); nothing was installed" ;;
	esac
	printf '%s' "$sig" | openssl base64 -d -A >"$tmp/manifest.sig" 2>/dev/null || true
	[ "$(wc -c <"$tmp/manifest.sig" | tr -d ' ')" = 64 ] || die "releases/manifest.json.sig is not base64 of a 64-byte signature; nothing was installed"
	verify_ed25519 "$tmp/release-key.pem" "$tmp/manifest.json" "$tmp/manifest.sig" ||
		die "the release manifest's signature does not verify with ${opt_release_key:+the key in }${opt_release_key:-the Outpost release key} (releases/manifest.json is unsigned, tampered with, or signed with another key); nothing was installed"

	found=$(manifest_select "$tmp/manifest.json" "$target" "$version") || true
	case $found in
	'= '*) ;;
	'! '*) die "the signed release manifest is not valid: ${found#! }; nothing was installed" ;;
	*)
		listed=${found#\?}
		die "the signed release manifest has no ${version:-release} for $target (it lists:${listed:- nothing}); nothing was installed"
		;;
	esac
	# shellcheck disable=SC2086 # four words, each checked by manifest_select
	set -- ${found#= }
	version=$1
	file=$2
	size=$3
	expected=$4

	say "installing outpost-agent $version for $target from $base"
	fetch "releases/$version/$file" "$tmp/$artifact" "$size"
	got_size=$(wc -c <"$tmp/$artifact" | tr -d ' ')
	got=$(sha256_of "$tmp/$artifact")
	if [ "$got_size" != "$size" ] || [ "$got" != "$expected" ]; then
		die "$file of release $version is not the one the signed release manifest lists (sha256 $expected, $size bytes): the download's is $got, $got_size bytes; nothing was installed"
	fi
	say "verified $file $version against the signed release manifest"
}

# --no-verify-release: the release's SHA256SUMS, from the same gateway, is all there is.
download_unverified() {
	warn "--no-verify-release: the release's signature is not checked; the agent is only compared with the SHA256SUMS the gateway serves"
	version=${opt_version:-latest}
	if [ "$version" = latest ]; then
		fetch releases/latest/VERSION "$tmp/VERSION" 1024
		version=$(head -n 1 "$tmp/VERSION" | tr -d ' \r\t')
	fi
	case $version in
	'' | *[!A-Za-z0-9.+-]* | [.+-]*) die "\"$version\" is not a version" ;;
	esac

	say "installing outpost-agent $version for $target from $base"
	fetch "releases/$version/SHA256SUMS" "$tmp/SHA256SUMS" 65536
	fetch "releases/$version/$artifact" "$tmp/$artifact" 536870912

	expected=$(awk -v f="$artifact" '$2 == f || $2 == "*" f { print $1; exit }' "$tmp/SHA256SUMS")
	[ -n "$expected" ] || die "SHA256SUMS of release $version has no entry for $artifact; nothing was installed"
	got=$(sha256_of "$tmp/$artifact")
	[ "$got" = "$expected" ] || die "checksum mismatch for $artifact: SHA256SUMS says $expected, the download is $got; nothing was installed"
}

# ---------------------------------------------------------------- install

install_agent() {
	init=$(detect_init)
	umask 022
	ensure_user
	agent_owner=$uid:$gid
	upgrade=0
	[ -f "$(r "$BIN")" ] && upgrade=1

	# Who had the agent's directories until now: another user (root, before this script
	# made an outpost user) means they change hands, with the agent stopped first.
	before=''
	for d in "$(r /opt/outpost/bin)" "$(r "$STATE")" "$(r "$PLUGINS")"; do
		if [ -d "$d" ] && ! owned_by "$uid" "$d"; then
			# shellcheck disable=SC2012 # the owner's number, the third field of ls -n
			before=$(ls -ldn "$d" | awk '{ print $3 }')
			break
		fi
	done
	if [ -n "$before" ]; then
		stop_for_handover "$init"
	fi

	# Root's: /opt/outpost, the configuration, checks.d, the log directory. The agent's
	# user's: what the agent writes (its binary's directory, for self-updates; state,
	# outbox, plugins; its identity), recursively when they change hands (-h: a symbolic
	# link is changed itself, never what it points to). /etc/outpost is root's and
	# sticky: the agent may create files there (its identity) but not replace root's.
	mkdir -p "$(r /opt/outpost/bin)" "$(r "$STATE")" "$(r "$PLUGINS")" "$(r "$LOGS")" "$(r "$ETC/checks.d")"
	chown -h 0:0 "$(r /opt/outpost)" "$(r "$ETC/checks.d")" "$(r "$LOGS")"
	chmod 0755 "$(r /opt/outpost)" "$(r "$ETC/checks.d")" "$(r "$LOGS")"
	chown -h "0:$gid" "$(r "$ETC")"
	if [ "$run_as" = root ]; then
		chmod 0755 "$(r "$ETC")"
	else
		chmod 1770 "$(r "$ETC")"
	fi
	for d in "$(r /opt/outpost/bin)" "$(r "$STATE")" "$(r "$PLUGINS")"; do
		owned_by "$uid" "$d" || chown -hR "$agent_owner" "$d"
		chown -h "$agent_owner" "$d"
	done
	chmod 0755 "$(r /opt/outpost/bin)" "$(r "$PLUGINS")"
	# The outbox and state are the agent's alone.
	chmod 0700 "$(r "$STATE")"
	if [ -n "$before" ] && [ "$run_as" = root ]; then
		# What the former user could write and root would act on: the cached checks and
		# collectors (run before the gateway is reached), the binary a rollback puts back.
		# The agent fetches its checks again; plugins are checked against their sha256.
		rm -rf "$(r "$STATE")/config.json" "$(r "$STATE")/collectors" "$(r "$BIN").previous" "$(r /opt/outpost/bin/.outpost-agent.new)"
	fi
	for f in "$(config_value fingerprint_file)" "$(config_value secret_file)" "$ETC/agent.finger" "$ETC/agent.secret"; do
		if [ -n "$f" ] && { [ -e "$(r "$f")" ] || [ -L "$(r "$f")" ]; }; then
			chown -h "$agent_owner" "$(r "$f")"
		fi
	done
	# supervise-daemon (OpenRC) opens the log as the agent's user.
	[ -e "$(r "$AGENT_LOG")" ] || : >>"$(r "$AGENT_LOG")"
	chown -h "$agent_owner" "$(r "$AGENT_LOG")"
	chmod 0640 "$(r "$AGENT_LOG")"
	case $init in
	systemd) mkdir -p "$(dirname "$(r "$SYSTEMD_UNIT")")" ;;
	openrc | sysv) mkdir -p "$(dirname "$(r "$INITD_SCRIPT")")" ;;
	esac

	# The binary, ready in a directory only root may write to, then renamed into place.
	[ ! -d "$(r "$BIN")" ] || die "$BIN is a directory: remove it and run this again"
	cp "$tmp/$artifact" "$(r "$STAGED")"
	chmod 0755 "$(r "$STAGED")"
	chown "$agent_owner" "$(r "$STAGED")"
	mv -f "$(r "$STAGED")" "$(r "$BIN")"

	# Root's files in /etc/outpost are written as new temporary files (mktemp: a name the
	# agent's user cannot have planted) and renamed into place.
	if [ -n "$opt_ca" ]; then
		t=$(mktemp "$(r "$ETC")/.ca.pem.XXXXXX")
		cp "$opt_ca" "$t"
		chmod 0644 "$t"
		mv -f "$t" "$(r "$CA_COPY")"
	fi
	t=$(mktemp "$(r "$ETC")/.run-as.XXXXXX")
	printf '%s\n' "$run_as" >"$t"
	chmod 0644 "$t"
	mv -f "$t" "$(r "$RUN_AS_FILE")"

	# agent.toml: written whole the first time; afterwards only the keys that options give
	# a new value change, and everything else (labels, groups, edits) stays. Readable by
	# root and the agent's group: it holds the enrollment key.
	new=$(mktemp "$(r "$ETC")/.agent.toml.XXXXXX")
	chown "0:$gid" "$new"
	chmod 0640 "$new"
	if [ -f "$(r "$CONFIG")" ]; then
		drop=''
		set_gateway=''
		set_key=''
		set_trust=''
		if [ -n "$opt_gateway" ] && [ "$(config_value gateway_url)" != "wss://$gateway" ]; then
			set_gateway=1
			drop="$drop gateway_url"
		fi
		if [ -n "$opt_key" ] && [ "$(config_value enroll_key)" != "$opt_key" ]; then
			set_key=1
			drop="$drop enroll_key"
		fi
		if [ -n "$opt_ca" ] && { [ "$(config_value ca_file)" != "$CA_COPY" ] || [ -n "$(config_value pin_sha256)" ]; }; then
			set_trust=1
		fi
		if [ -n "$opt_pin" ] && { [ "$(config_value pin_sha256)" != "$opt_pin" ] || [ -n "$(config_value ca_file)" ]; }; then
			set_trust=1
		fi
		[ -z "$set_trust" ] || drop="$drop ca_file pin_sha256"
		if [ -n "$drop" ]; then
			{
				[ -z "$set_gateway" ] || printf 'gateway_url = "wss://%s"\n' "$gateway"
				[ -z "$set_key" ] || printf 'enroll_key = "%s"\n' "$opt_key"
				if [ -n "$set_trust" ] && [ -n "$opt_ca" ]; then
					printf 'ca_file = "%s"\n' "$CA_COPY"
				elif [ -n "$set_trust" ]; then
					printf 'pin_sha256 = "%s"\n' "$opt_pin"
				fi
				awk -v drop="$drop" '
					BEGIN { n = split(drop, d, " ") }
					/^[ \t]*\[/ { table = 1 }
					!table { for (i = 1; i <= n; i++) if ($0 ~ "^[ \t]*" d[i] "[ \t]*=") next }
					{ print }' "$(r "$CONFIG")"
			} >"$new"
			old=$(mktemp "$(r "$ETC")/.agent.toml.old.XXXXXX")
			cp -p "$(r "$CONFIG")" "$old"
			chown "0:$gid" "$old"
			chmod 0640 "$old"
			mv -f "$old" "$(r "$CONFIG").old"
			mv -f "$new" "$(r "$CONFIG")"
			say "updated$drop in $CONFIG (the previous file is $CONFIG.old)"
		else
			rm -f "$new"
			# Root's, so not replaceable by the agent's user (see refuse_links).
			chown "0:$gid" "$(r "$CONFIG")"
			chmod 0640 "$(r "$CONFIG")"
			say "kept $CONFIG as it is"
		fi
	else
		{
			printf '# Outpost agent configuration, written by install.sh (docs/INSTALL.md).\n'
			printf '# Running install.sh again changes only the keys its options give new values.\n'
			printf 'gateway_url = "wss://%s"\n' "$gateway"
			printf 'enroll_key = "%s"\n' "$opt_key"
			[ -z "$opt_ca" ] || printf 'ca_file = "%s"\n' "$CA_COPY"
			[ -z "$opt_pin" ] || printf 'pin_sha256 = "%s"\n' "$opt_pin"
			printf 'state_dir = "%s"\n' "$STATE"
			printf 'fingerprint_file = "%s"\n' "$ETC/agent.finger"
			printf 'secret_file = "%s"\n' "$ETC/agent.secret"
			printf 'checks_dir = "%s"\n' "$ETC/checks.d"
			printf 'plugins_dir = "%s"\n' "$PLUGINS"
		} >"$new"
		mv -f "$new" "$(r "$CONFIG")"
		say "wrote $CONFIG"
	fi

	if [ -n "$before" ] && [ "$run_as" = outpost ]; then
		say "outpost-agent ran as uid $before until now; from now on it and its plugins run as the outpost user, which now owns $BIN, $STATE, $PLUGINS and the agent's identity in $ETC. A check that needs root stops working: see docs/INSTALL.md (--run-as root keeps root)"
	elif [ -n "$before" ]; then
		say "outpost-agent ran as uid $before until now; from now on it runs as root (--run-as root)"
	fi
	if [ "$run_as" = root ]; then
		warn "--run-as root: the agent and every plugin it runs are root on this host, so whoever can change its checks (on the gateway, or in $ETC/checks.d) can do anything here (docs/INSTALL.md)"
	fi
	start_service "$init"
	if [ "$upgrade" = 1 ]; then
		say "upgraded outpost-agent to $version ($BIN); identity, state and outbox kept; it runs as the $run_as user"
	else
		say "installed outpost-agent $version ($BIN); it runs as the $run_as user"
	fi
}

# Everything runs from main, called on the last line: a download cut short runs nothing,
# and nothing that reads stdin can eat the rest of a piped script.
main() {
	parse_args "$@"
	check_host
	if [ "$uninstall" = 1 ]; then
		uninstall_agent
		exit 0
	fi
	[ "$purge" = 0 ] || die "--purge goes with --uninstall"
	decide
	tmp=$(mktemp -d "${TMPDIR:-/tmp}/outpost-install.XXXXXX") || die "cannot make a temporary directory"
	trap 'rm -rf "$tmp"' EXIT
	trap 'exit 130' INT TERM
	download
	install_agent
}

main "$@"
