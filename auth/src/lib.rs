//! Bearer tokens on write paths, shared by the KDN, the gateway's control plane and the
//! instance agent: how a request proves it may write, and the start-up rule that a
//! component with no token stays on loopback unless told `insecure`.
//!
//! A crate of its own so that the gateway library and the KDN share it without the
//! gateway depending on the KDN server.

use std::net::SocketAddr;

/// The environment variable that holds a KDN's write token, read by the KDN and by the
/// gateways that write to it.
pub const KDN_TOKEN_ENV: &str = "CACHEROUTE_KDN_TOKEN";

/// The environment variable that holds a gateway's control-plane token, read by the
/// gateway and by the members (KDNs, agents) that register with it.
pub const CONTROL_TOKEN_ENV: &str = "CACHEROUTE_CONTROL_TOKEN";

/// Whether an `Authorization` header value carries `Bearer <token>`. The comparison
/// takes the same time wherever the first difference is.
pub fn bearer_matches(authorization: Option<&[u8]>, token: &str) -> bool {
    let Some(value) = authorization else {
        return false;
    };
    let given = value
        .strip_prefix(b"Bearer ")
        .or_else(|| value.strip_prefix(b"bearer "));
    secret_matches(given, token)
}

/// Whether `given` is exactly the (non-empty) `token`, compared in constant time.
pub fn secret_matches(given: Option<&[u8]>, token: &str) -> bool {
    let Some(given) = given else {
        return false;
    };
    let want = token.as_bytes();
    if want.is_empty() {
        return false;
    }
    if given.len() != want.len() {
        return false;
    }
    given
        .iter()
        .zip(want)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// The token from the config, else from the environment variable `env`.
pub fn token_or_env(configured: &str, env: &str) -> String {
    if !configured.is_empty() {
        return configured.to_string();
    }
    std::env::var(env).unwrap_or_default()
}

/// A component asked to serve writes without a token beyond this machine.
#[derive(Debug, thiserror::Error)]
#[error(
    "{what} on {listen} has no token: anyone who can reach it could write to it. \
     Set {env} (or the config's token), listen on loopback, or pass --insecure"
)]
pub struct UnauthenticatedListen {
    /// The component ("KDN", "control plane", ...).
    pub what: String,
    pub listen: SocketAddr,
    /// The environment variable that would supply the token.
    pub env: String,
}

/// Refuse to serve unauthenticated writes beyond this machine: with no token, `listen`
/// must be a loopback address unless `insecure`. Says so loudly either way.
pub fn check_unauthenticated_listen(
    what: &str,
    listen: SocketAddr,
    token: &str,
    insecure: bool,
    env: &str,
) -> Result<(), UnauthenticatedListen> {
    if !token.is_empty() {
        return Ok(());
    }
    if !listen.ip().is_loopback() && !insecure {
        return Err(UnauthenticatedListen {
            what: what.to_string(),
            listen,
            env: env.to_string(),
        });
    }
    tracing::warn!(
        "{what} on {listen} has NO TOKEN: its write paths are open to anyone who can reach \
         it; set {env} (or the config's token) in production"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer() {
        assert!(bearer_matches(Some(b"Bearer s3cret"), "s3cret"));
        assert!(bearer_matches(Some(b"bearer s3cret"), "s3cret"));
        assert!(!bearer_matches(Some(b"Bearer s3cre"), "s3cret"));
        assert!(!bearer_matches(Some(b"Bearer s3cretX"), "s3cret"));
        assert!(!bearer_matches(Some(b"Basic s3cret"), "s3cret"));
        assert!(!bearer_matches(Some(b"s3cret"), "s3cret"));
        assert!(!bearer_matches(None, "s3cret"));
        assert!(
            !bearer_matches(Some(b"Bearer "), ""),
            "an empty token never matches"
        );
        assert!(secret_matches(Some(b"t"), "t"));
        assert!(!secret_matches(Some(b""), ""));
    }

    #[test]
    fn unauthenticated_listen_stays_on_loopback() {
        let lo: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:1".parse().unwrap();
        assert!(check_unauthenticated_listen("x", lo, "", false, "E").is_ok());
        let err = check_unauthenticated_listen("x", any, "", false, "E").unwrap_err();
        assert!(err.to_string().contains("--insecure"), "{err}");
        assert!(check_unauthenticated_listen("x", any, "", true, "E").is_ok());
        assert!(check_unauthenticated_listen("x", any, "t", false, "E").is_ok());
    }
}
