//! Membership: what a KDN or an instance agent sends to a gateway's control plane
//! (`POST /v1/members`) every heartbeat, and how it names itself when it leaves
//! (`DELETE /v1/members/{kind}/{id}`).

use serde::{Deserialize, Serialize};

/// What registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberKind {
    Kdn,
    Agent,
}

impl MemberKind {
    /// The kind named in a URL path (`kdn`, `agent`).
    pub fn parse(s: &str) -> Option<MemberKind> {
        match s {
            "kdn" => Some(MemberKind::Kdn),
            "agent" => Some(MemberKind::Agent),
            _ => None,
        }
    }

    /// The name used on the wire and in paths.
    pub fn name(self) -> &'static str {
        match self {
            MemberKind::Kdn => "kdn",
            MemberKind::Agent => "agent",
        }
    }
}

/// A registration (the body of `POST /v1/members`). Unknown fields are refused: a
/// registration comes from our own components, and a typo would otherwise be lost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    pub kind: MemberKind,
    /// Unique per kind (`kdn@127.0.0.1:9101`, `agent@...`).
    pub id: String,
    /// Where the gateway reaches the member.
    pub url: String,
    /// Agents only: the base URL of the engine beside the agent (the instance it
    /// reports on). Absent for KDNs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Seconds after which the gateway forgets a member that stopped registering
    /// (absent: the gateway's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<f64>,
}

/// One entry of a gateway's `GET /v1/members` (`{"object": "list", "data": [...]}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberEntry {
    pub kind: MemberKind,
    pub id: String,
    pub url: String,
    /// Agents: the engine's base URL; null for KDNs.
    pub instance: Option<String>,
    /// Seconds until the member expires without another heartbeat.
    pub expires_in_s: f64,
    /// Seconds since the member first registered (continuously).
    pub member_for_s: f64,
}
