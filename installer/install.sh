#!/bin/sh
# Outpost agent installer for Linux (x86_64, aarch64), served by the gateway at
# /install.sh:
#
#   curl -fsSL https://GATEWAY/install.sh | sudo sh -s -- --key KEY
#
# Downloads the static agent from the gateway that served this script, verifies its
# SHA-256 against the release's SHA256SUMS, installs it to /opt/outpost/bin, writes
# /etc/outpost/agent.toml and starts the outpost-agent service (systemd, OpenRC or SysV
# init). Run it again to upgrade; --uninstall removes it. `sh install.sh --help` and
# docs/INSTALL.md say the rest. POSIX sh; passes `shellcheck -s sh`.

set -eu

# The gateway that served this script writes its own address here.
served_gateway=''

usage() {
	cat <<'EOF'
Usage: install.sh [options]            (as root)

  --key KEY          enrollment key of your tenant (env OUTPOST_KEY); needed the
                     first time
  --gateway HOST[:PORT]
                     the gateway (env OUTPOST_GATEWAY; https:// or wss:// prefixes
                     are accepted); default: the gateway that served this script,
                     else the one in an existing agent.toml
  --ca FILE          trust the gateway by this PEM CA file (env OUTPOST_CA)
  --pin SHA256       trust the gateway by the SHA-256 of its certificate, as the
                     gateway prints it ("pin_sha256 ...") (env OUTPOST_PIN)
                     Neither: the system's root certificates.
  --version VERSION  install this agent version (env OUTPOST_VERSION); default latest
  --init SYSTEM      systemd, openrc, sysv or none (env OUTPOST_INIT); default: the
                     init system running here
  --uninstall        stop and remove the agent; keeps its identity (agent.finger,
                     agent.secret), its state and outbox, and checks.d
  --purge            with --uninstall: remove those too
  -h, --help         this text

OUTPOST_ROOT=DIR installs under DIR instead of / (for packaging and tests); the files
still name the real paths (/opt/outpost/..., /etc/outpost/...).
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
SYSTEMD_UNIT=/etc/systemd/system/outpost-agent.service
INITD_SCRIPT=/etc/init.d/outpost-agent
# ... and where they are on this filesystem.
r() { printf '%s%s' "$ROOT" "$1"; }

need_arg() {
	[ "$2" -ge 2 ] || die "$1 needs a value (see --help)"
}

# Options from the command line, over the environment.
parse_args() {
	opt_key=${OUTPOST_KEY:-}
	opt_gateway=${OUTPOST_GATEWAY:-}
	opt_ca=${OUTPOST_CA:-}
	opt_pin=${OUTPOST_PIN:-}
	opt_version=${OUTPOST_VERSION:-}
	opt_init=${OUTPOST_INIT:-}
	uninstall=0
	purge=0

	while [ $# -gt 0 ]; do
		case $1 in
		--key) need_arg "$1" $#; opt_key=$2; shift 2 ;;
		--key=*) opt_key=${1#*=}; shift ;;
		--gateway) need_arg "$1" $#; opt_gateway=$2; shift 2 ;;
		--gateway=*) opt_gateway=${1#*=}; shift ;;
		--ca) need_arg "$1" $#; opt_ca=$2; shift 2 ;;
		--ca=*) opt_ca=${1#*=}; shift ;;
		--pin) need_arg "$1" $#; opt_pin=$2; shift 2 ;;
		--pin=*) opt_pin=${1#*=}; shift ;;
		--version) need_arg "$1" $#; opt_version=$2; shift 2 ;;
		--version=*) opt_version=${1#*=}; shift ;;
		--init) need_arg "$1" $#; opt_init=$2; shift 2 ;;
		--init=*) opt_init=${1#*=}; shift ;;
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
supervisor=supervise-daemon
respawn_delay=5
output_log=/var/log/outpost/agent.log
error_log=/var/log/outpost/agent.log
retry="TERM/30/KILL/5"

depend() {
	need net
	after firewall
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

running() {
	[ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null
}

start() {
	if running; then
		echo "outpost-agent is already running"
		return 0
	fi
	mkdir -p /var/log/outpost
	nohup "$BIN" run --config "$CONFIG" >>"$LOG" 2>&1 </dev/null &
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

# Install the service files of INIT and (re)start the agent under it.
start_service() {
	case $1 in
	systemd)
		write_systemd_unit >"$(r "$SYSTEMD_UNIT")"
		chmod 0644 "$(r "$SYSTEMD_UNIT")"
		systemctl daemon-reload
		systemctl enable outpost-agent.service
		systemctl restart outpost-agent.service
		say "started the outpost-agent service (systemd); logs: journalctl -u outpost-agent"
		;;
	openrc)
		write_openrc_script >"$(r "$INITD_SCRIPT")"
		chmod 0755 "$(r "$INITD_SCRIPT")"
		rc-update add outpost-agent default
		rc-service outpost-agent restart
		say "started the outpost-agent service (OpenRC); logs: $LOGS/agent.log"
		;;
	sysv)
		write_sysv_script >"$(r "$INITD_SCRIPT")"
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
		say "Start the agent yourself, as root:"
		printf '\n    %s run --config %s\n\n' "$BIN" "$CONFIG"
		say "(it logs to stderr; e.g. append  >>$LOGS/agent.log 2>&1 &  to run it in the background)"
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

# ---------------------------------------------------------------- uninstall

uninstall_agent() {
	init=$(detect_init)
	stop_service "$init"
	rm -f "$(r "$BIN")" "$(r "$CONFIG")" "$(r "$CONFIG").old" "$(r "$CA_COPY")"
	rm -rf "$(r "$PLUGINS")" "$(r "$LOGS")"
	if [ "$purge" = 1 ]; then
		rm -rf "$(r "$ETC")" "$(r /opt/outpost)"
		say "removed the agent, its configuration, identity, state and outbox"
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

# The leaf certificate curl reported (-w %{certs}) must hash to the pin. The body is
# only written to a temporary file and is thrown away when it does not.
check_pin() {
	# Whole lines only: the text fields before the PEM block are the server's to choose.
	awk '/^-----BEGIN CERTIFICATE-----$/ { on = 1; next }
		/^-----END CERTIFICATE-----$/ { if (on) exit }
		on && /^[A-Za-z0-9+\/=]+$/ { print }' "$1" >"$tmp/leaf.b64"
	[ -s "$tmp/leaf.b64" ] || die "curl did not report the gateway's certificate (it needs version 7.88 or newer for --pin); upgrade curl or trust the gateway with --ca FILE"
	if have base64; then
		base64 -d <"$tmp/leaf.b64" >"$tmp/leaf.der"
	else
		openssl base64 -d <"$tmp/leaf.b64" >"$tmp/leaf.der"
	fi
	got=$(sha256_of "$tmp/leaf.der")
	[ "$got" = "$pin" ] || die "the gateway's certificate does not match the pin: expected $pin, got $got (nothing was installed)"
}

# fetch PATH DEST MAX: download $base/PATH into DEST (at most MAX bytes, with curl), with
# the gateway trusted as decided.
fetch() {
	path=$1
	url=$base/$1
	dest=$2
	max=$3
	case $downloader in
	curl)
		set -- -gsS --proto =https --connect-timeout 15 --max-time 600 --retry 2 --max-filesize "$max" -o "$dest"
		rc=0
		if [ -n "$pin" ]; then
			# -k: the pin, checked below on the same connection's certificate, replaces
			# chain validation, as it does in the agent.
			curl "$@" -k -w '%{http_code}\n%{certs}' "$url" >"$tmp/curl.out" 2>"$tmp/curl.err" || rc=$?
		elif [ -n "$ca" ]; then
			curl "$@" -w '%{http_code}\n' --cacert "$ca" "$url" >"$tmp/curl.out" 2>"$tmp/curl.err" || rc=$?
		else
			curl "$@" -w '%{http_code}\n' "$url" >"$tmp/curl.out" 2>"$tmp/curl.err" || rc=$?
		fi
		case $rc in
		0) ;;
		6) die "cannot resolve the gateway's name in $url: check --gateway" ;;
		7 | 28) die "cannot reach the gateway at $url (is it running, and is its port open?): $(cat "$tmp/curl.err")" ;;
		35 | 51 | 53 | 54 | 58 | 59 | 60 | 77 | 80 | 83 | 90 | 91)
			die "cannot verify the gateway's certificate at $url: pass --ca FILE or --pin SHA256 (docs/INSTALL.md): $(cat "$tmp/curl.err")" ;;
		63) die "$url is larger than the $max bytes it may have" ;;
		*) die "downloading $url failed (curl exit $rc): $(cat "$tmp/curl.err")" ;;
		esac
		[ -z "$pin" ] || check_pin "$tmp/curl.out"
		code=$(head -n 1 "$tmp/curl.out")
		case $code in
		200) ;;
		404) die "the gateway has no $path ($url answered 404: $(head -c 300 "$dest"))" ;;
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
		8) die "the gateway has no $path ($url answered an error)" ;;
		*) die "downloading $url failed (wget exit $rc): $(cat "$tmp/wget.err")" ;;
		esac
		;;
	esac
}

# The build for this machine, the gateway, how to trust it, and how to download.
decide() {
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

	[ -z "$opt_ca" ] || [ -z "$opt_pin" ] || die "give either --ca or --pin, not both"
	if [ -n "$opt_ca" ]; then
		[ -r "$opt_ca" ] || die "cannot read the CA file \"$opt_ca\""
		grep -q -- '-----BEGIN CERTIFICATE-----' "$opt_ca" || die "CA file \"$opt_ca\" holds no PEM certificate"
	fi
	if [ -n "$opt_pin" ]; then
		opt_pin=$(printf '%s' "$opt_pin" | tr -d ':' | tr 'A-F' 'a-f')
		case $opt_pin in
		*[!0-9a-f]*) die "--pin must be 64 hex digits (the gateway prints it as pin_sha256), got \"$opt_pin\"" ;;
		esac
		[ ${#opt_pin} = 64 ] || die "--pin must be 64 hex digits (the gateway prints it as pin_sha256), got \"$opt_pin\""
	fi
	case $opt_key in
	*[!A-Za-z0-9._-]*) die "the enrollment key may hold only letters, digits, '.', '_' and '-'" ;;
	esac
	[ ${#opt_key} -le 256 ] || die "the enrollment key is longer than 256 characters"
	[ -f "$(r "$CONFIG")" ] || [ -n "$opt_key" ] || die "the first install needs an enrollment key: pass --key KEY (or set OUTPOST_KEY)"

	# How downloads trust the gateway: the options, else what agent.toml says, else the system.
	ca=$opt_ca
	pin=$opt_pin
	if [ -z "$ca$pin" ]; then
		pin=$(config_value pin_sha256)
		if [ -z "$pin" ] && [ -n "$(config_value ca_file)" ]; then
			ca=$(r "$(config_value ca_file)")
		fi
	fi

	if have curl; then
		downloader=curl
	elif have wget; then
		downloader=wget
		[ -z "$pin" ] || die "--pin needs curl (7.88 or newer); install curl or trust the gateway with --ca FILE"
	else
		die "neither curl nor wget is installed; install one of them and run this again"
	fi
	base=https://$gateway
}

# Download the release into $tmp and verify it; nothing on the host changes here.
download() {
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
	mkdir -p "$(r /opt/outpost/bin)" "$(r "$STATE")" "$(r "$PLUGINS")" "$(r "$LOGS")" "$(r "$ETC/checks.d")"
	chmod 0755 "$(r /opt/outpost)" "$(r /opt/outpost/bin)" "$(r "$ETC")" "$(r "$ETC/checks.d")"
	# The outbox and state are the agent's alone.
	chmod 0700 "$(r "$STATE")"
	case $init in
	systemd) mkdir -p "$(dirname "$(r "$SYSTEMD_UNIT")")" ;;
	openrc | sysv) mkdir -p "$(dirname "$(r "$INITD_SCRIPT")")" ;;
	esac

	upgrade=0
	[ -f "$(r "$BIN")" ] && upgrade=1
	cp "$tmp/$artifact" "$(r "$BIN").new"
	chmod 0755 "$(r "$BIN").new"
	mv -f "$(r "$BIN").new" "$(r "$BIN")"

	if [ -n "$opt_ca" ]; then
		cp "$opt_ca" "$(r "$CA_COPY").new"
		chmod 0644 "$(r "$CA_COPY").new"
		mv -f "$(r "$CA_COPY").new" "$(r "$CA_COPY")"
	fi

	# agent.toml: written whole the first time; afterwards only the keys that options give
	# a new value change, and everything else (labels, groups, edits) stays.
	umask 077
	new=$(r "$CONFIG").new
	: >"$new"
	chmod 0600 "$new"
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
			cp -p "$(r "$CONFIG")" "$(r "$CONFIG").old"
			mv -f "$new" "$(r "$CONFIG")"
			say "updated$drop in $CONFIG (the previous file is $CONFIG.old)"
		else
			rm -f "$new"
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
	chmod 0600 "$(r "$CONFIG")"
	umask 022

	start_service "$init"
	if [ "$upgrade" = 1 ]; then
		say "upgraded outpost-agent to $version ($BIN); identity, state and outbox kept"
	else
		say "installed outpost-agent $version ($BIN)"
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
