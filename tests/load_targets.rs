//! `switchboard-load --target janus` against a real Janus 1.1.x VideoRoom (Debian's package),
//! both in a network namespace of their own made with `scripts/janus-videoroom`: the adapter
//! speaks Janus's HTTP API, its lite publisher and receivers connect, and the report shows the
//! media delivered intact. Skipped without Janus, unless SWITCHBOARD_REQUIRE_JANUS is set (CI).

use std::path::Path;
use std::process::Command;

const REQUIRE_ENV: &str = "SWITCHBOARD_REQUIRE_JANUS";
const SUBSCRIBERS: u64 = 4;

#[test]
fn the_load_generator_measures_janus_videoroom() {
    let required = std::env::var_os(REQUIRE_ENV).is_some();
    if !Path::new("/usr/bin/janus").exists() {
        assert!(
            !required,
            "{REQUIRE_ENV} is set but /usr/bin/janus is missing"
        );
        eprintln!("SKIPPED: no /usr/bin/janus (Debian's janus package)");
        return;
    }
    if !Command::new("unshare")
        .args(["-n", "true"])
        .status()
        .is_ok_and(|s| s.success())
    {
        assert!(
            !required,
            "{REQUIRE_ENV} is set but `unshare -n` is not allowed"
        );
        eprintln!("SKIPPED: cannot make a network namespace");
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = std::env::temp_dir().join(format!("switchboard-janus-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let report = dir.join("report.json");
    let script = format!(
        r#"set -e
ip link set lo up
eval "$({root}/scripts/janus-videoroom --config-dir {dir}/janus | grep '^JANUS_')"
set +e
"{load}" --target janus --server "$JANUS_URL" --server-pid "$JANUS_PID" \
  --receiver-device jlo0 --subscribers {SUBSCRIBERS} --duration 3s --warmup 1s --quiet \
  --json-out {report}
rc=$?
kill "$JANUS_PID"
exit $rc
"#,
        dir = dir.display(),
        load = env!("CARGO_BIN_EXE_switchboard-load"),
        report = report.display(),
    );
    let out = Command::new("unshare")
        .args(["-n", "sh", "-c", &script])
        .output()
        .expect("running the generator against Janus");
    let log = || {
        format!(
            "stdout:\n{}\nstderr:\n{}\njanus log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(dir.join("janus/janus.log")).unwrap_or_default()
        )
    };
    assert!(out.status.success(), "the run failed: {}", log());
    let text = std::fs::read_to_string(&report).unwrap_or_else(|e| panic!("{e}: {}", log()));
    let report: serde_json::Value = serde_json::from_str(&text).expect("the report is JSON");

    assert_eq!(report["target"], "janus");
    assert_eq!(
        report["participants_joined"],
        SUBSCRIBERS + 1,
        "everyone joined: {}",
        log()
    );
    let delivery = &report["delivery"];
    // Every subscriber gets the publisher's audio and video, intact.
    assert_eq!(delivery["streams"], 2 * SUBSCRIBERS, "{delivery}");
    assert_eq!(delivery["bad_payloads"], 0, "{delivery}");
    let loss = delivery["loss_pct"].as_f64().unwrap_or(100.0);
    assert!(loss < 1.0, "{loss} % lost: {delivery}");
    // 200 packets/s from the publisher to each subscriber, most of the 3 s window.
    let received = delivery["received_packets"].as_u64().unwrap_or(0);
    assert!(
        received >= SUBSCRIBERS * 200 * 5 / 2,
        "only {received} packets received: {delivery}"
    );
    assert!(
        report["latency_ms"]["all"]["count"].as_u64() > Some(0),
        "sampled latencies: {}",
        report["latency_ms"]
    );
    // The server's process was found and measured.
    assert!(report["server"]["cpu_s_per_million_received"].as_f64() > Some(0.0));
    assert!(
        report["warnings"].as_array().is_some_and(|w| w.is_empty()),
        "{}",
        report["warnings"]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
