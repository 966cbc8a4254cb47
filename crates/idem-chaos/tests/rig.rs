//! The rig's checks bite: gateways told to free a key whose outcome is unknown once its lease
//! expires (`--unknown-outcome release`, a documented trade) run such keys again, and the rig
//! must report those executions as duplicates it does not allow, and fail.

use std::process::Command;

#[test]
fn the_rig_reports_duplicates_from_gateways_that_release_unknown_outcomes() {
    let Ok(idem) = std::env::var("IDEM_TEST_BIN") else {
        eprintln!(
            "SKIPPED the_rig_reports_duplicates_from_gateways_that_release_unknown_outcomes: IDEM_TEST_BIN is not set (scripts/test.sh sets it to the release build of idem)"
        );
        assert!(
            std::env::var("IDEM_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "IDEM_TEST_BIN is needed under IDEM_REQUIRE_SERVICES=1"
        );
        return;
    };
    let output = Command::new(env!("CARGO_BIN_EXE_idem-chaos"))
        .args(["--seed", "3", "--stores", "sqlite", "--no-messaging", "--seconds", "8"])
        .args(["--idem", &idem])
        .arg("--gateway-arg=--unknown-outcome=release")
        .output()
        .expect("the rig runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(!output.status.success(), "the rig passed a gateway that runs keys twice:\n{stdout}");
    assert!(stderr.contains("VIOLATIONS with seed 3"), "{stderr}");
    let duplicates = stdout
        .lines()
        .find(|line| line.starts_with("| duplicate executions, any other cause |"))
        .and_then(|line| line.trim_end_matches(" |").rsplit("| ").next())
        .and_then(|count| count.trim().parse::<u64>().ok())
        .expect("the duplicates row");
    assert!(duplicates > 0, "{stdout}");
}
