//! An object's single PUT to S3 leaves its body out of the SigV4 signature
//! (`UNSIGNED-PAYLOAD`) and vouches for it with a signed `x-amz-checksum-crc32` instead
//! (`format-spec/remote-s3.md`, "Authentication"): moto, checking every signature, accepts it
//! and serves the bytes back; requests without a body keep the SHA-256 form.

use std::sync::{Arc, Mutex};

use base64::Engine as _;
use stackvault::store::{Backend, S3Backend};

use crate::faultproxy::FaultProxy;
use crate::moto::Moto;

#[test]
fn a_put_signs_its_crc32_instead_of_hashing_its_body() -> anyhow::Result<()> {
    let Some(moto) = Moto::start() else {
        return Ok(());
    };
    // (method, x-amz-content-sha256, x-amz-checksum-crc32, signed headers) of each request.
    type Heads = Vec<(String, String, Option<String>, String)>;
    let heads: Arc<Mutex<Heads>> = Arc::default();
    let seen = heads.clone();
    let proxy = FaultProxy::start(moto.port, move |r| {
        let header = |n: &str| r.header(n).map(str::to_owned);
        let signed = header("authorization")
            .and_then(|a| a.split("SignedHeaders=").nth(1).map(str::to_owned))
            .unwrap_or_default();
        if let Ok(mut h) = seen.lock() {
            h.push((
                r.method.to_string(),
                header("x-amz-content-sha256").unwrap_or_default(),
                header("x-amz-checksum-crc32"),
                signed,
            ));
        }
        None
    })?;
    moto.backend("s3://unsigned/p")?;
    let mut options = moto.options();
    options.endpoint = Some(proxy.endpoint());
    let b = S3Backend::new("s3://unsigned/p", options, moto.credentials())?;
    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i * 31 % 253) as u8).collect();
    b.put("packs/ab/ab01", &body)?;
    assert_eq!(b.get("packs/ab/ab01")?, body, "stored bytes differ");

    let heads = heads
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let put = heads
        .iter()
        .find(|h| h.0 == "PUT")
        .ok_or_else(|| anyhow::anyhow!("no PUT seen: {heads:?}"))?;
    assert_eq!(put.1, "UNSIGNED-PAYLOAD", "{put:?}");
    let crc =
        base64::engine::general_purpose::STANDARD.encode(crc32fast::hash(&body).to_be_bytes());
    assert_eq!(put.2.as_deref(), Some(crc.as_str()), "{put:?}");
    assert!(
        put.3.contains("x-amz-checksum-crc32"),
        "not signed: {put:?}"
    );
    // The GET has no body to vouch for: the SHA-256 of nothing, as before.
    let get = heads
        .iter()
        .find(|h| h.0 == "GET")
        .ok_or_else(|| anyhow::anyhow!("no GET seen: {heads:?}"))?;
    assert_eq!(
        get.1,
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(get.2, None);
    Ok(())
}
