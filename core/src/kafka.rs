//! librdkafka client settings built from [`KafkaConfig`], with TLS/SASL passed through.
//!
//! Every stage builds its producers, consumers and admin clients from [`client_config`], so a
//! deployment that needs `sasl_ssl` sets it once in `omrs-stream.toml`.

use rdkafka::ClientConfig;

use crate::config::KafkaConfig;

/// Base client settings: bootstrap servers, security, then raw `properties` (which win).
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &cfg.bootstrap_servers);
    let optional = [
        ("security.protocol", &cfg.security_protocol),
        ("sasl.mechanisms", &cfg.sasl_mechanism),
        ("sasl.username", &cfg.sasl_username),
        ("sasl.password", &cfg.sasl_password),
        ("ssl.ca.location", &cfg.ssl_ca_location),
        ("ssl.certificate.location", &cfg.ssl_certificate_location),
        ("ssl.key.location", &cfg.ssl_key_location),
        ("ssl.key.password", &cfg.ssl_key_password),
    ];
    for (key, value) in optional {
        if let Some(v) = value {
            cc.set(key, v);
        }
    }
    for (k, v) in &cfg.properties {
        cc.set(k, v);
    }
    cc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn security_settings_pass_through() {
        let mut cfg = KafkaConfig {
            security_protocol: Some("sasl_ssl".into()),
            sasl_mechanism: Some("SCRAM-SHA-512".into()),
            sasl_username: Some("site-a".into()),
            sasl_password: Some("pw".into()),
            ssl_ca_location: Some("/etc/ca.pem".into()),
            ..KafkaConfig::default()
        };
        cfg.properties.insert("client.id".into(), "omrs".into());
        let cc = client_config(&cfg);
        assert_eq!(cc.get("bootstrap.servers"), Some("127.0.0.1:9092"));
        assert_eq!(cc.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(cc.get("sasl.mechanisms"), Some("SCRAM-SHA-512"));
        assert_eq!(cc.get("sasl.username"), Some("site-a"));
        assert_eq!(cc.get("sasl.password"), Some("pw"));
        assert_eq!(cc.get("ssl.ca.location"), Some("/etc/ca.pem"));
        assert_eq!(cc.get("client.id"), Some("omrs"));
        assert_eq!(cc.get("ssl.key.location"), None);
    }
}
