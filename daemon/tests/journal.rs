//! The offline journal on a real sled directory: outcomes survive a reopen and expire.

use std::os::unix::fs::PermissionsExt as _;

use codemantle_daemon::journal::{Journal, JournalError};

#[test]
fn outcome_recorded_survives_reopen_and_expires() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    {
        let j = Journal::open(&data, 3600).unwrap();
        assert_eq!(j.lookup("dev1:7:md", 1_000).unwrap(), None);
        j.record_outcome("dev1:7:md", b"{\"o\":1}", 1_000).unwrap();
        j.record_outcome("dev1:8:rn", b"\x00binary\xff", 1_500)
            .unwrap();
        assert_eq!(
            j.lookup("dev1:7:md", 1_001).unwrap().as_deref(),
            Some(&b"{\"o\":1}"[..])
        );
    }
    // Created private.
    let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);

    let j = Journal::open(&data, 3600).unwrap();
    assert_eq!(
        j.lookup("dev1:7:md", 2_000).unwrap().as_deref(),
        Some(&b"{\"o\":1}"[..])
    );
    assert_eq!(
        j.lookup("dev1:8:rn", 2_000).unwrap().as_deref(),
        Some(&b"\x00binary\xff"[..])
    );
    // Expired by lookup time, then pruned one at a time.
    assert_eq!(j.lookup("dev1:7:md", 4_600).unwrap(), None);
    assert!(j.lookup("dev1:8:rn", 4_600).unwrap().is_some());
    assert_eq!(j.prune(4_600).unwrap(), 1);
    assert_eq!(j.outcome_count(), 1);
    assert_eq!(j.prune(5_100).unwrap(), 1);
    assert_eq!(j.outcome_count(), 0);
    drop(j);

    // Pruning is durable too.
    let j = Journal::open(&data, 3600).unwrap();
    assert_eq!(j.outcome_count(), 0);
}

#[test]
fn many_records_prune_only_expired() {
    let tmp = tempfile::tempdir().unwrap();
    let j = Journal::open(&tmp.path().join("data"), 100).unwrap();
    for i in 0..200u64 {
        j.record_outcome(&format!("s:{i}:md"), &i.to_be_bytes(), 1_000 + i)
            .unwrap();
    }
    // Records at 1000..=1049 are expired at 1150.
    assert_eq!(j.prune(1_150).unwrap(), 51);
    assert_eq!(j.outcome_count(), 149);
    assert!(j.lookup("s:50:md", 1_150).unwrap().is_none());
    assert!(j.lookup("s:51:md", 1_150).unwrap().is_some());
}

#[test]
fn second_instance_on_same_data_dir_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let _first = Journal::open(&data, 3600).unwrap();
    let err = Journal::open(&data, 3600).unwrap_err();
    assert!(matches!(err, JournalError::Open { .. }), "{err}");
    assert!(
        err.to_string().contains("another codemantle-daemon"),
        "{err}"
    );
}

#[test]
fn world_writable_data_dir_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = Journal::open(&data, 3600).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("world-writable") && msg.contains("chmod 700"),
        "{msg}"
    );
}
