//! The wire contract, from the KDN's side: what a running KDN serialises (registry
//! snapshot with and without text, contents, load, injection job, error body,
//! membership registration) deserialises into the types the gateway reads
//! (`cacheroute_wire`) without losing anything those types hold.

mod common;

use bytes::Bytes;
use cacheroute_kdn::keys::RemoteMetadata;
use cacheroute_kdn::membership::MemberInfo;
use cacheroute_kdn::spawn_kdn;
use cacheroute_kdn::store::{named_memory_store, Chunk, KvStore};
use cacheroute_wire::error::ErrorBody;
use cacheroute_wire::kdn::{Contents, InjectJob, InjectRequest, JobStatus, KdnLoad, Snapshot};
use cacheroute_wire::members::{MemberKind, Registration};
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

const CHUNK: usize = 16;

fn chunk(i: usize) -> Chunk {
    let meta = RemoteMetadata::kv_2ltd("bfloat16", 32, CHUNK, 1024).unwrap();
    Chunk {
        kv_bytes: Bytes::from(vec![i as u8; 64]),
        metadata: Bytes::copy_from_slice(&meta.to_bytes()),
    }
}

/// Parse `v` as `T`, then check that serialising `T` again gives back every field of `v`
/// that `T` knows (its own serialisation is a subset of `v`: nothing read was changed).
fn lossless<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) -> T {
    let t: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v}"));
    assert_subset(&serde_json::to_value(&t).unwrap(), v, "$");
    t
}

fn assert_subset(part: &Value, whole: &Value, at: &str) {
    match (part, whole) {
        (Value::Object(p), Value::Object(w)) => {
            for (k, pv) in p {
                let wv = w
                    .get(k)
                    .unwrap_or_else(|| panic!("{at}.{k} added by the reader"));
                assert_subset(pv, wv, &format!("{at}.{k}"));
            }
        }
        (Value::Array(p), Value::Array(w)) => {
            assert_eq!(p.len(), w.len(), "{at}");
            for (i, (pv, wv)) in p.iter().zip(w).enumerate() {
                assert_subset(pv, wv, &format!("{at}[{i}]"));
            }
        }
        // numbers may change representation (u64 written, f64 read back): compare values
        (Value::Number(p), Value::Number(w)) => {
            assert_eq!(p.as_f64(), w.as_f64(), "{at}")
        }
        _ => assert_eq!(part, whole, "{at}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kdn_payloads_read_back_in_the_gateways_types() {
    let mut cfg = config("memory://wire-reg", "memory://wire-store");
    cfg.kdn.id = Some("kdn-wire".into());
    cfg.models.push(model("m16", CHUNK, None));
    cfg.targets
        .push(target("t", "memory://wire-target", Some(10.0)));
    let kdn = spawn_kdn(cfg).await.unwrap();
    let base = kdn.url();
    let client = http();

    // a block, made kv_ready by putting its chunks in the KDN store and re-warming
    let text = knowledge_text("Wire harbor", 80);
    let a = call(
        client
            .post(format!("{base}/v1/knowledge?wait=true"))
            .json(&json!({
                "text": text, "id": "blk-w", "title": "Harbor", "tags": ["sea"]
            })),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let a = call(client.get(format!("{base}/v1/knowledge?keys=1"))).await;
    let keys: Vec<String> =
        serde_json::from_value(a.body["data"][0]["models"]["m16"]["keys"].clone()).unwrap();
    let items: Vec<(String, Chunk)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.clone(), chunk(i)))
        .collect();
    named_memory_store("wire-store")
        .put_chunks(&items)
        .await
        .unwrap();
    let a = call(client.post(format!("{base}/v1/knowledge/blk-w/warm?wait=true"))).await;
    assert_eq!(a.body["models"]["m16"]["status"], "kv_ready", "{}", a.body);

    // the full snapshot: every block field the gateway reads, as the KDN wrote it
    let full = call(client.get(format!("{base}/v1/knowledge/snapshot"))).await;
    let snap: Snapshot = lossless(&full.body);
    assert_eq!((snap.kdn_id.as_str(), snap.text), ("kdn-wire", true));
    assert_eq!(snap.version, full.body["version"].as_str().unwrap());
    let b = &snap.blocks[0];
    assert_eq!(b.id, "blk-w");
    assert_eq!(b.title.as_deref(), Some("Harbor"));
    assert_eq!(b.tags, ["sea"]);
    assert_eq!(b.text, text);
    assert_eq!(b.text_bytes, text.len() as u64);
    assert!(b.digest.is_some());
    let m = &b.models["m16"];
    assert!(m.kv_ready() && m.chunk_size == CHUNK as u64 && m.chunks == keys.len() as u64);
    assert_eq!(m.tokens, m.chunks * m.chunk_size);
    assert!(m.content.contains(&text[..30]), "{}", m.content);

    // the text-less snapshot and the contents that fill it in give the same blocks
    let lean = call(client.get(format!("{base}/v1/knowledge/snapshot?text=false"))).await;
    let lean: Snapshot = lossless(&lean.body);
    assert!(!lean.text);
    assert!(lean.blocks[0].text.is_empty() && lean.blocks[0].models["m16"].content.is_empty());
    assert_eq!(lean.blocks[0].digest, b.digest);
    let contents = call(client.get(format!("{base}/v1/knowledge/contents?ids=blk-w"))).await;
    let contents: Contents = lossless(&contents.body);
    assert_eq!(contents.data, snap.blocks);

    // an injection job, asked for with the gateway's request type
    let req = InjectRequest {
        knowledge_ids: vec!["blk-w".into()],
        model: "m16".into(),
        target: "t".into(),
        wait: Some(true),
        timeout_ms: Some(30_000),
    };
    let job = call(client.post(format!("{base}/v1/inject")).json(&req)).await;
    let job: InjectJob = lossless(&job.body);
    assert_eq!(job.status, JobStatus::Done, "{job:?}");
    assert_eq!((job.model.as_str(), job.target.as_str()), ("m16", "t"));
    assert_eq!(job.chunks_done, job.chunks_total);
    assert_eq!(job.error, None);
    let again = call(client.get(format!("{base}/v1/inject/{}", job.id))).await;
    assert_eq!(lossless::<InjectJob>(&again.body).id, job.id);

    // the load report
    let load = call(client.get(format!("{base}/v1/load"))).await;
    let load: KdnLoad = lossless(&load.body);
    assert_eq!(load.kdn_id, "kdn-wire");
    assert_eq!(load.knowledge_blocks, 1);
    assert_eq!(load.targets["t"].link_gbps, Some(10.0));

    // an error body
    let e = call(client.get(format!("{base}/v1/knowledge/nope"))).await;
    assert_eq!(e.status, 404);
    let e: ErrorBody = lossless(&e.body);
    assert_eq!(e.error.code.as_deref(), Some("knowledge_not_found"));

    kdn.stop().await;
}

#[test]
fn a_registration_reads_back_in_the_gateways_type() {
    let info = MemberInfo {
        kind: MemberKind::Agent,
        id: "agent@x".into(),
        url: "http://127.0.0.1:9001".into(),
        gateways: vec![],
        token: String::new(),
        heartbeat: Duration::from_secs(2),
        instance: Some("http://127.0.0.1:8000".into()),
        on_attempt: None,
    };
    let sent = serde_json::to_value(info.body()).unwrap();
    let read: Registration = lossless(&sent);
    assert_eq!(read, info.body());
    assert_eq!(read.ttl_s, Some(6.0));
}

#[test]
fn a_payload_missing_a_required_field_is_an_error() {
    // a KDN load whose `pending_transfers` was renamed must not read as zero
    let mut load = serde_json::to_value(KdnLoad::default()).unwrap();
    let v = load
        .as_object_mut()
        .unwrap()
        .remove("pending_transfers")
        .unwrap();
    load["pending_transfer"] = v;
    let e = serde_json::from_value::<KdnLoad>(load).unwrap_err();
    assert!(e.to_string().contains("pending_transfers"), "{e}");
    // a snapshot block without its per-model status
    let block = json!({"id": "b", "title": null, "tags": [], "text_bytes": 0, "models": {
        "m": {"template": "llama3", "tokens": 16, "chunks": 1, "chunk_size": 16,
              "bytes": 0, "resident": []}}});
    let e = serde_json::from_value::<cacheroute_wire::kdn::SnapshotBlock>(block).unwrap_err();
    assert!(e.to_string().contains("status"), "{e}");
    // a job without its status
    let e = serde_json::from_value::<InjectJob>(json!({"id": "j"})).unwrap_err();
    assert!(e.to_string().contains("missing field"), "{e}");
}
