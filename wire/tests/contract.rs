//! The contract's own rules: required fields are required, optional ones may be
//! absent, unknown fields are ignored (or refused where documented).

use cacheroute_wire::agent::AgentLoad;
use cacheroute_wire::error::ErrorBody;
use cacheroute_wire::kv_handle::KvHandle;
use cacheroute_wire::members::Registration;
use serde_json::json;

#[test]
fn agent_load_fields_are_required_and_extras_optional() {
    let minimal = json!({"engine_up": true, "running": 2, "waiting": 1, "kv_usage": 0.5,
                         "prompt_tokens_per_s": 10.0, "resident": ["a"], "later_field": 1});
    let l: AgentLoad = serde_json::from_value(minimal.clone()).unwrap();
    assert_eq!((l.running, l.waiting, l.resident.len()), (2, 1, 1));
    assert_eq!((l.id, l.age_ms), (None, None));
    let mut renamed = minimal;
    renamed.as_object_mut().unwrap().remove("waiting");
    renamed["queued"] = json!(1);
    let e = serde_json::from_value::<AgentLoad>(renamed).unwrap_err();
    assert!(e.to_string().contains("waiting"), "{e}");
}

#[test]
fn registrations_refuse_unknown_and_missing_fields() {
    let ok = json!({"kind": "kdn", "id": "k", "url": "http://x:1"});
    let r: Registration = serde_json::from_value(ok).unwrap();
    assert_eq!((r.instance, r.ttl_s), (None, None));
    assert!(serde_json::from_value::<Registration>(
        json!({"kind": "kdn", "id": "k", "url": "http://x:1", "ttl": 3})
    )
    .is_err());
    assert!(serde_json::from_value::<Registration>(json!({"kind": "kdn", "id": "k"})).is_err());
    assert!(
        serde_json::from_value::<Registration>(json!({"kind": "gpu", "id": "k", "url": "u"}))
            .is_err()
    );
}

#[test]
fn error_bodies_and_kv_handles_round_trip() {
    let e = ErrorBody::new("no such block", "not_found", Some("knowledge_not_found"));
    let v = serde_json::to_value(&e).unwrap();
    assert_eq!(v["error"]["type"], "not_found");
    assert_eq!(serde_json::from_value::<ErrorBody>(v).unwrap(), e);
    // OpenAI's own bodies may carry `"code": null`
    let openai = json!({"error": {"message": "m", "type": "invalid_request_error", "code": null}});
    assert_eq!(
        serde_json::from_value::<ErrorBody>(openai)
            .unwrap()
            .error
            .code,
        None
    );
    assert!(serde_json::from_value::<ErrorBody>(json!({"error": {"message": "m"}})).is_err());

    let h = KvHandle {
        job: "j".into(),
        chunks: 2,
        tokens: 512,
    };
    let v = serde_json::to_value(&h).unwrap();
    assert_eq!(serde_json::from_value::<KvHandle>(v).unwrap(), h);
    assert!(serde_json::from_value::<KvHandle>(json!({"job": "j", "chunks": 2})).is_err());
    assert!(KvHandle {
        job: String::new(),
        ..h
    }
    .checked()
    .is_err());
}
