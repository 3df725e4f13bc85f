//! Tests that change a server globally, in their own test binary so that no other test binary
//! runs meanwhile: the agent refuses a server whose binlog is not ROW (site-c), and a purged
//! position is a clear error that `--resnapshot` recovers from (site-b).

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
/// Purges binlogs of site-b: this binary runs alone, and its other test changes site-c only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_position_is_a_clear_error_and_resnapshot_recovers() {
    let env = Env::new("purge", "site-b", &[]).await;
    env.catch_up();
    let mut c = admin(env.port, None).await;
    // The agent is away; the site writes, rotates and purges.
    let mut site = env.db().await;
    site.query_drop("UPDATE person_name SET given_name = 'Purged' WHERE person_name_id = 1").await.unwrap();
    c.query_drop("FLUSH BINARY LOGS").await.unwrap();
    let current: mysql_async::Row = c.query_first("SHOW MASTER STATUS").await.unwrap().unwrap();
    let file: String = current.get(0).unwrap();
    // A binlog dump thread whose client is gone keeps its file until it notices; end them
    // (this binary runs alone, so no live agent is affected), then purge.
    let dumps: Vec<mysql_async::Row> = c.query("SELECT id FROM information_schema.processlist WHERE command LIKE 'Binlog Dump%'").await.unwrap();
    for d in dumps {
        let id: u64 = d.get(0).unwrap();
        let _ = c.query_drop(format!("KILL {id}")).await;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
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
        .find(|e| e.table.as_deref() == Some("person_name") && e.op != omrs_core::envelope::Op::Schema && e.key.as_ref().unwrap()["person_name_id"] == 1)
        .unwrap();
    assert_eq!(last_name.op, omrs_core::envelope::Op::Read, "the fresh snapshot carries the change the purge lost");
    assert_eq!(last_name.after.as_ref().unwrap()["given_name"], "Purged");
    env.drop().await;
}
