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
