//! The agent refuses a server whose binlog is not ROW, naming the setting and the fix. Its own
//! test binary: it changes a global server setting, so nothing else may run meanwhile.

mod common;

use common::*;
use mysql_async::prelude::Queryable;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_binlog_format_is_refused_with_the_fix() {
    let env = Env::new("refuse", "site-c", &[]).await;
    let mut c = admin(env.port, None).await;
    c.query_drop("SET GLOBAL binlog_format = 'STATEMENT'").await.unwrap();
    let out = env.agent(&["--until-caught-up"]).wait_with_output().unwrap();
    c.query_drop("SET GLOBAL binlog_format = 'ROW'").await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("binlog_format is STATEMENT (need ROW)"), "{err}");
    assert!(err.contains("SET GLOBAL binlog_format = 'ROW'"), "{err}");
    assert!(env.events().is_empty(), "nothing was sent");
    env.drop().await;
}

/// A position purged while the agent was away is a clear error; `--resnapshot` recovers.
/// (Purges binlogs of site-c: this binary runs alone.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_position_is_a_clear_error_and_resnapshot_recovers() {
    let env = Env::new("purge", "site-c", &[]).await;
    env.catch_up();
    let mut c = admin(env.port, None).await;
    // The agent is away; the site writes, rotates and purges.
    let mut site = env.db().await;
    site.query_drop("UPDATE person_name SET given_name = 'Purged' WHERE person_name_id = 1").await.unwrap();
    c.query_drop("FLUSH BINARY LOGS").await.unwrap();
    let current: mysql_async::Row = c.query_first("SHOW MASTER STATUS").await.unwrap().unwrap();
    let file: String = current.get(0).unwrap();
    // A replica connection that has not yet noticed its client is gone keeps its file; retry
    // until the server really purged it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        c.query_drop(format!("PURGE BINARY LOGS TO '{file}'")).await.unwrap();
        let first: mysql_async::Row = c.query_first("SHOW BINARY LOGS").await.unwrap().unwrap();
        if first.get::<String, _>(0).unwrap() == file {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the server would not purge up to {file}");
        c.query_drop("DO SLEEP(0.5)").await.unwrap();
    }

    let out = env.agent(&["--until-caught-up"]).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is no longer on the server") && err.contains("--resnapshot"), "{err}");

    let out = env.agent(&["--until-caught-up", "--resnapshot"]).wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let events = env.events();
    let last_name = events
        .iter()
        .rev()
        .find(|e| e.table.as_deref() == Some("person_name") && e.key.as_ref().unwrap()["person_name_id"] == 1)
        .unwrap();
    assert_eq!(last_name.op, omrs_core::envelope::Op::Read, "the fresh snapshot carries the change the purge lost");
    assert_eq!(last_name.after.as_ref().unwrap()["given_name"], "Purged");
    env.drop().await;
}
