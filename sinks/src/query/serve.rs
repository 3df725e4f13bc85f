//! `omrs-stream query --serve HOST:PORT`: the lake over the PostgreSQL wire protocol
//! (datafusion-postgres), for psql, Grafana, Metabase or Superset. Read only, like `query`.
//!
//! Who may connect: on a loopback address with no password file, anyone on the machine (the
//! demo, a notebook); on any other address a password is required, checked with SCRAM-SHA-256
//! as PostgreSQL does (the password itself never crosses the wire), and with a certificate the
//! server speaks TLS only, refusing a client that does not ask for it. Everything is checked
//! before the port is opened: a bad file fails the start, never falls back to plain text.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion_postgres::pgwire::api::auth::sasl::scram::{gen_salted_password, ScramAuth, SCRAM_ITERATIONS};
use datafusion_postgres::pgwire::api::auth::sasl::SASLAuthStartupHandler;
use datafusion_postgres::pgwire::api::auth::{AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler};
use datafusion_postgres::pgwire::api::cancel::DefaultCancelHandler;
use datafusion_postgres::pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use datafusion_postgres::pgwire::api::{ClientInfo, ConnectionManager, PgWireServerHandlers};
use datafusion_postgres::pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use datafusion_postgres::pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use datafusion_postgres::{DfSessionService, ServerOptions};
use futures::Sink;

use super::{context, lake_stamp, ServeArgs};
use crate::SinkError;

/// Who may connect to `query --serve`, from its arguments; checked before anything is served.
#[derive(Debug, Clone)]
pub struct Access {
    host: String,
    port: u16,
    user: String,
    password: Option<String>,
    /// The certificate chain and its key (PEM).
    tls: Option<(PathBuf, PathBuf)>,
}

impl Access {
    /// `addr` is --serve's HOST:PORT. Fails, naming the file or the flag, on an address that is
    /// not HOST:PORT, an unreadable or empty password file, a certificate or key that is not
    /// PEM of the kind the server reads, TLS without a password, or an address other than
    /// loopback without a password.
    pub fn from_args(addr: &str, args: &ServeArgs) -> Result<Access, SinkError> {
        let bad = || SinkError::Usage(format!("--serve {addr}: expected HOST:PORT, e.g. 127.0.0.1:5433"));
        let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let password = args.password_file.as_deref().map(omrs_core::config::read_secret).transpose().map_err(|m| SinkError::Usage(format!("--password-file {m}")))?;
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => {
                check_pem(cert, "--tls-cert", &["CERTIFICATE"])?;
                check_pem(key, "--tls-key", &["PRIVATE KEY"])?;
                Some((cert.clone(), key.clone()))
            }
            (None, None) => None,
            _ => return Err(SinkError::Usage("--tls-cert and --tls-key go together".into())),
        };
        if tls.is_some() && password.is_none() {
            return Err(SinkError::Usage("--tls-cert without --password-file: TLS keeps the data private on the wire, but anyone could still connect; give the user a password".into()));
        }
        let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !loopback && password.is_none() {
            return Err(SinkError::Usage(format!(
                "--serve {addr} would let anyone who can reach this host read every clinic's records: give --password-file (and --tls-cert/--tls-key), or serve on 127.0.0.1"
            )));
        }
        Ok(Access { host, port, user: args.user.clone(), password, tls })
    }
}

/// The file is PEM with a block of one of the `kinds` (the server reads X.509 certificates and
/// PKCS#8 keys); a PKCS#1 or SEC1 key is named with the command that converts it.
fn check_pem(path: &Path, flag: &str, kinds: &[&str]) -> Result<(), SinkError> {
    let text = std::fs::read_to_string(path).map_err(|e| SinkError::Usage(format!("{flag} {}: {e}", path.display())))?;
    if kinds.iter().any(|k| text.contains(&format!("-----BEGIN {k}-----"))) {
        return Ok(());
    }
    let hint = if text.contains("-----BEGIN RSA PRIVATE KEY-----") || text.contains("-----BEGIN EC PRIVATE KEY-----") {
        format!(": the key is PKCS#1/SEC1; convert it with `openssl pkcs8 -topk8 -nocrypt -in {0} -out {0}.pk8`", path.display())
    } else if text.contains("ENCRYPTED PRIVATE KEY") {
        ": the key is encrypted; the server needs it unencrypted (readable by its user only)".to_string()
    } else {
        String::new()
    };
    Err(SinkError::Usage(format!("{flag} {}: no PEM `BEGIN {}` block{hint}", path.display(), kinds.join("`/`BEGIN "))))
}

/// The one user's SCRAM secret: a salted password, as PostgreSQL stores it.
#[derive(Debug)]
struct Secret {
    user: String,
    salt: Vec<u8>,
    salted: Vec<u8>,
}

#[async_trait]
impl AuthSource for Secret {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        if login.user() == Some(self.user.as_str()) {
            return Ok(Password::new(Some(self.salt.clone()), self.salted.clone()));
        }
        tracing::warn!(user = login.user().unwrap_or(""), host = login.host(), "query --serve: login refused (unknown user)");
        Err(refuse("28P01", format!("password authentication failed for user \"{}\"", login.user().unwrap_or(""))))
    }
}

fn refuse(code: &str, message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new("FATAL".into(), code.into(), message)))
}

/// The startup of one connection: TLS first when the server has a certificate, then SCRAM.
struct Login {
    tls_only: bool,
    sasl: SASLAuthStartupHandler<DefaultServerParameterProvider>,
}

#[async_trait]
impl StartupHandler for Login {
    async fn on_startup<C>(&self, client: &mut C, message: PgWireFrontendMessage) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if self.tls_only && !client.is_secure() {
            tracing::warn!(client = %client.socket_addr(), "query --serve: a client without TLS was refused");
            return Err(refuse("28000", "this server accepts TLS connections only (sslmode=require)".into()));
        }
        self.sasl.on_startup(client, message).await
    }
}

/// datafusion-postgres's query handling with our login.
struct Handlers {
    session: Arc<DfSessionService>,
    secret: Arc<Secret>,
    connections: Arc<ConnectionManager>,
    tls_only: bool,
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.session.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.session.clone()
    }

    /// A new handler for each connection: SCRAM keeps the exchange's state in it.
    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        let sasl = SASLAuthStartupHandler::new(Arc::new(DefaultServerParameterProvider::default()))
            .with_scram(ScramAuth::new(self.secret.clone()))
            .with_connection_manager(self.connections.clone());
        Arc::new(Login { tls_only: self.tls_only, sasl })
    }

    fn cancel_handler(&self) -> Arc<impl datafusion_postgres::pgwire::api::cancel::CancelHandler> {
        Arc::new(DefaultCancelHandler::new(self.connections.clone()))
    }
}

/// `omrs-stream query --serve HOST:PORT`: the lake over the PostgreSQL wire protocol, until the
/// process is stopped. Every 2 s it looks for a new snapshot or manifest entry, and swaps the
/// served schemas (`changes`, `current`, and the default one with the views) for new ones.
pub async fn serve(lake_root: &Path, access: &Access) -> Result<(), SinkError> {
    let (host, port) = (access.host.as_str(), access.port);
    let addr = format!("{host}:{port}");
    let ctx = Arc::new(context(lake_root).await?);
    datafusion_postgres::datafusion_pg_catalog::setup_pg_catalog(&ctx, "datafusion", datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider)
        .map_err(|e| SinkError::Query(format!("setting up pg_catalog: {e}")))?;
    let refresh = {
        let ctx = ctx.clone();
        let lake_root = lake_root.to_path_buf();
        tokio::spawn(async move {
            let mut stamp = lake_stamp(&lake_root);
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                let now = lake_stamp(&lake_root);
                if now == stamp {
                    continue;
                }
                match context(&lake_root).await {
                    Ok(fresh) => {
                        if let (Some(served), Some(new)) = (ctx.catalog("datafusion"), fresh.catalog("datafusion")) {
                            for name in new.schema_names() {
                                if let Some(schema) = new.schema(&name) {
                                    let _ = served.register_schema(&name, schema);
                                }
                            }
                        }
                        tracing::info!(snapshot = ?now.0, manifest_seq = ?now.1, "serving the lake's new state");
                        stamp = now;
                    }
                    Err(e) => tracing::warn!(error = %e, "reading the lake's new state failed; still serving the previous one"),
                }
            }
        })
    };
    let _refresh = crate::kafka::AbortOnDrop(refresh);
    let mut opts = ServerOptions::new().with_host(host.to_string()).with_port(port);
    if let Some((cert, key)) = &access.tls {
        opts = opts.with_tls_cert_path(Some(cert.display().to_string())).with_tls_key_path(Some(key.display().to_string()));
    }
    let how = match (&access.password, &access.tls) {
        (None, _) => "no password, loopback only".to_string(),
        (Some(_), None) => format!("user {}, SCRAM-SHA-256, no TLS", access.user),
        (Some(_), Some(_)) => format!("user {}, SCRAM-SHA-256, TLS only", access.user),
    };
    tracing::info!(addr, lake = %lake_root.display(), access = %how, "serving the lake over the PostgreSQL wire protocol");
    eprintln!("serving {} on postgresql://{addr} ({how}; psql -h {host} -p {port} -U {}); Ctrl-C stops", lake_root.display(), access.user);
    let Some(password) = &access.password else {
        return datafusion_postgres::serve(ctx, &opts).await.map_err(|e| SinkError::io(format!("serving on {addr}"), e));
    };
    let salt = uuid::Uuid::new_v4().into_bytes().to_vec();
    let secret = Arc::new(Secret { user: access.user.clone(), salted: gen_salted_password(password, &salt, SCRAM_ITERATIONS), salt });
    let handlers = Handlers { session: Arc::new(DfSessionService::new(ctx)), secret, connections: Arc::new(ConnectionManager::new()), tls_only: access.tls.is_some() };
    datafusion_postgres::serve_with_handlers(Arc::new(handlers), &opts).await.map_err(|e| SinkError::io(format!("serving on {addr}"), e))
}
