//! Results survive the agent itself: what a check produced while the gateway was away is
//! kept on disk (the redb outbox) through a kill -9 of the agent, and delivered once.

use std::time::Duration;

use outpost_e2e::*;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_queued_during_an_outage_survive_kill_9_of_the_agent() {
    let dir = tempdir();
    let mut gw = Gateway::start(dir.path(), &[]);
    gw.write_checks(
        "c.toml",
        "[[check]]\nname = \"tick\"\ncommand = \"/bin/echo tick\"\ninterval = 1\n",
    );
    let mut agent = Agent::start(dir.path(), "keeper", &gw, "reconnect_max_secs = 1\n");
    let fp = agent.fingerprint.clone();
    eventually(T, "first result", || gw.latest(&fp, "tick")).await;

    // The gateway dies; the agent keeps running its check and queues the results.
    let listen = gw.addr.clone();
    gw.proc.signal(libc::SIGKILL);
    gw.proc.wait_exit(Duration::from_secs(10)).await;
    drop(gw);
    let outage_start = now_ms();
    let ran_before = logged(&agent.proc.log(), "check ran", "seq").len();
    // Four runs logged from here: only the first can have started before the outage. And
    // their commit to the outbox logged, since a result staged but not yet committed when
    // the process dies is gone (by design: a check never waits for the disk).
    eventually(T, "four runs during the outage, committed", || async {
        let log = agent.proc.log();
        let fourth = *logged(&log, "check ran", "seq").get(ran_before + 3)?;
        let committed = logged(&log, "outbox committed", "through")
            .into_iter()
            .max()?;
        (committed >= fourth).then_some(())
    })
    .await;
    // Then the agent dies too, without a chance to flush anything.
    agent.proc.signal(libc::SIGKILL);
    agent.proc.wait_exit(Duration::from_secs(10)).await;
    let outage_end = now_ms();
    drop(agent);

    let gw = Gateway::start_on(dir.path(), &listen, &[]);
    let agent = Agent::start(dir.path(), "keeper", &gw, "reconnect_max_secs = 1\n");
    assert_eq!(agent.fingerprint, fp, "same identity after the restart");
    let all = eventually(T, "the outage's results delivered", || async {
        let r = gw.bus_results(&fp, "tick");
        let during = r
            .iter()
            .filter(|x| {
                let t = x["started_at_ms"].as_u64().unwrap();
                (outage_start..outage_end).contains(&t)
            })
            .count();
        let after_restart = r
            .iter()
            .any(|x| x["started_at_ms"].as_u64().unwrap() > outage_end);
        (during >= 3 && after_restart).then_some(r)
    })
    .await;
    // Every sequence number once, in order; consecutive except for one jump where the
    // restarted agent began a new reserved block.
    let seqs: Vec<u64> = all.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let jumps = seqs.windows(2).filter(|w| w[1] != w[0] + 1).count();
    assert!(jumps <= 1, "a result went missing: {seqs:?}");
    let jump_at = seqs.windows(2).position(|w| w[1] != w[0] + 1);
    if let Some(i) = jump_at {
        assert!(
            all[i + 1]["started_at_ms"].as_u64().unwrap() > outage_end,
            "the only gap is at the restart: {seqs:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_outbox_is_moved_aside_and_reported() {
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    let state = dir.path().join("mangled");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("outbox.redb"), vec![0xA5u8; 64 * 1024]).unwrap();
    let agent = Agent::start(dir.path(), "mangled", &gw, "");
    let r = eventually(T, "outbox problem reported", || {
        gw.latest(&agent.fingerprint, "outpost.outbox")
    })
    .await;
    assert_eq!(r["status"], "critical", "{r}");
    assert!(r["output"].as_str().unwrap().contains("corrupt"), "{r}");
    let aside: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("outbox.redb.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "the damaged file is kept for inspection");
    assert!(agent.proc.log().contains("outbox file was corrupt"));
}
