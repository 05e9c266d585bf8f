//! Client crypto on the message path, beside the primitives it is built from, so the
//! overhead is visible: ratchet encrypt+decrypt of 1 KiB (same chain, and with a DH
//! step each message), X3DH initiate+respond, sealed sender seal+open; one AEAD
//! seal+open of 1 KiB, one HKDF, one X25519; attachment streaming in MB/s beside the
//! raw AEAD and SHA-256 over the same bytes.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use chacha20poly1305::aead::Aead;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce};
use criterion::{criterion_group, criterion_main, Criterion};
use ed25519_dalek::{Signer, SigningKey};
use prost::Message;
use rand::rngs::OsRng;
use tern_client::crypto::ratchet::Session;
use tern_client::crypto::sealed::{self, SenderCertificate};
use tern_client::crypto::x3dh::{self, AgreementKeyPair, PreKeyBundle};

struct Bob {
    bundle: PreKeyBundle,
    dh: AgreementKeyPair,
    spk: AgreementKeyPair,
    opk: AgreementKeyPair,
}

fn bob() -> Bob {
    let id = SigningKey::generate(&mut OsRng);
    let (dh, spk, opk) = (
        AgreementKeyPair::generate(&mut OsRng),
        AgreementKeyPair::generate(&mut OsRng),
        AgreementKeyPair::generate(&mut OsRng),
    );
    let bundle = PreKeyBundle {
        identity_key: id.verifying_key().to_bytes(),
        identity_dh: dh.public(),
        identity_dh_signature: id
            .sign(&tern_proto::auth::identity_agreement_key(&dh.public()))
            .to_bytes(),
        signed_prekey_id: 1,
        signed_prekey: spk.public(),
        signed_prekey_signature: id
            .sign(&tern_proto::auth::signed_prekey(1, &spk.public()))
            .to_bytes(),
        one_time_prekey: Some((1, opk.public())),
    };
    Bob {
        bundle,
        dh,
        spk,
        opk,
    }
}

fn sessions(b: &Bob) -> (Session, Session) {
    let alice_dh = AgreementKeyPair::generate(&mut OsRng);
    let verified = b.bundle.verify().unwrap();
    let (header, sk_a) = x3dh::initiate(&mut OsRng, &[1; 32], &alice_dh, &verified).unwrap();
    let sk_b = x3dh::respond(&b.bundle.identity_key, &b.dh, &b.spk, Some(&b.opk), &header).unwrap();
    let alice = Session::init_initiator(&mut OsRng, &sk_a, b.spk.public()).unwrap();
    (alice, Session::init_responder(&sk_b, b.spk.clone()))
}

fn crypto(c: &mut Criterion) {
    let msg = vec![0x5a; 1024];
    let b = bob();

    let (mut alice, mut bob_s) = sessions(&b);
    c.bench_function("ratchet_1k_same_chain", |bench| {
        bench.iter(|| {
            let (h, ct) = alice.encrypt(&msg).unwrap();
            bob_s.decrypt(&mut OsRng, &h, &ct).unwrap()
        })
    });

    let (mut alice, mut bob_s) = sessions(&b);
    let (h, ct) = alice.encrypt(&msg).unwrap();
    bob_s.decrypt(&mut OsRng, &h, &ct).unwrap();
    let mut turn = false;
    c.bench_function("ratchet_1k_dh_step", |bench| {
        bench.iter(|| {
            turn = !turn;
            let (from, to) = if turn {
                (&mut bob_s, &mut alice)
            } else {
                (&mut alice, &mut bob_s)
            };
            let (h, ct) = from.encrypt(&msg).unwrap();
            to.decrypt(&mut OsRng, &h, &ct).unwrap()
        })
    });

    c.bench_function("x3dh_initiate_respond", |bench| {
        let alice_dh = AgreementKeyPair::generate(&mut OsRng);
        bench.iter(|| {
            // Verifying the bundle is part of starting a session.
            let verified = b.bundle.verify().unwrap();
            let (header, _) = x3dh::initiate(&mut OsRng, &[1; 32], &alice_dh, &verified).unwrap();
            x3dh::respond(&b.bundle.identity_key, &b.dh, &b.spk, Some(&b.opk), &header).unwrap()
        })
    });

    let relay = SigningKey::generate(&mut OsRng);
    let encoded = tern_proto::v1::SenderCertificate {
        account_id: vec![1u8; 16].into(),
        device_id: 1,
        identity_key: vec![2u8; 32].into(),
        expires_at_ms: u64::MAX,
        relay_key: relay.verifying_key().to_bytes().to_vec().into(),
    }
    .encode_to_vec();
    let sig = relay
        .sign(&tern_proto::auth::sender_certificate(&encoded))
        .to_bytes();
    let cert = SenderCertificate::parse(&encoded, &sig).unwrap();
    let relay_key = relay.verifying_key().to_bytes();
    c.bench_function("sealed_sender_seal_open_validate_1k", |bench| {
        bench.iter(|| {
            let sealed = sealed::seal(&mut OsRng, &b.dh.public(), &cert, &msg).unwrap();
            let (cert, content) = sealed::open(&b.dh, &sealed).unwrap();
            cert.validate(&relay_key, 0).unwrap();
            content
        })
    });

    let aead = ChaCha20Poly1305::new(&[7u8; 32].into());
    c.bench_function("primitive_aead_seal_open_1k", |bench| {
        bench.iter(|| {
            let ct = aead.encrypt(Nonce::from_slice(&[0; 12]), &msg[..]).unwrap();
            aead.decrypt(Nonce::from_slice(&[0; 12]), &ct[..]).unwrap()
        })
    });
    c.bench_function("primitive_hkdf_sha256_64", |bench| {
        bench.iter(|| {
            let mut out = [0u8; 64];
            hkdf::Hkdf::<sha2::Sha256>::new(Some(&[1; 32]), &[2; 32])
                .expand(b"info", &mut out)
                .unwrap();
            out
        })
    });
    let (x, y) = (
        x25519_dalek::StaticSecret::random_from_rng(OsRng),
        AgreementKeyPair::generate(&mut OsRng),
    );
    c.bench_function("primitive_x25519", |bench| {
        bench.iter(|| {
            x.diffie_hellman(&x25519_dalek::PublicKey::from(y.public()))
                .to_bytes()
        })
    });
}

/// Attachment streaming: encrypt then decrypt 8 MiB, against the raw AEAD over the
/// same bytes in 64 KiB pieces, in MB/s.
fn attachments(c: &mut Criterion) {
    use tern_client::crypto::attachment::{self, Decryptor};
    const LEN: usize = 8 << 20;
    let plain = vec![0x42u8; LEN];
    let key = [3u8; 32];
    let mut group = c.benchmark_group("attachment_8MiB");
    group.throughput(criterion::Throughput::Bytes(LEN as u64));
    let mut sealed = Vec::with_capacity(LEN + LEN / 1000 + 64);
    let e = attachment::encrypt(&mut OsRng, &key, &plain[..], &mut sealed).unwrap();
    group.bench_function("encrypt", |bench| {
        bench.iter(|| {
            let mut out = Vec::with_capacity(sealed.len());
            attachment::encrypt(&mut OsRng, &key, &plain[..], &mut out).unwrap()
        })
    });
    group.bench_function("decrypt_and_verify_id", |bench| {
        bench.iter(|| {
            let mut out = Vec::with_capacity(LEN);
            let mut d = Decryptor::new(&key, e.blob_id);
            d.update(&sealed, &mut out).unwrap();
            d.finish(&mut out).unwrap()
        })
    });
    let aead = ChaCha20Poly1305::new(&key.into());
    group.bench_function("primitive_aead_seal_64k_pieces", |bench| {
        bench.iter(|| {
            plain
                .chunks(attachment::SEGMENT)
                .map(|p| aead.encrypt(Nonce::from_slice(&[0; 12]), p).unwrap().len())
                .sum::<usize>()
        })
    });
    group.bench_function("primitive_sha256", |bench| {
        bench.iter(|| <sha2::Sha256 as sha2::Digest>::digest(&sealed))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(2));
    targets = crypto, attachments
}
criterion_main!(benches);
