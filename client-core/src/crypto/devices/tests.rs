use super::*;
use rand::rngs::OsRng;

fn account(b: u8) -> AccountId {
    AccountId([b; 16])
}

fn entry(id: u32) -> DeviceEntry {
    DeviceEntry {
        id: DeviceId::new(id).expect("id"),
        device_key: SigningKey::generate(&mut OsRng).verifying_key().to_bytes(),
        identity_dh: [id as u8; 32],
    }
}

fn list(version: u64, ids: &[u32]) -> DeviceList {
    DeviceList {
        account: account(1),
        version,
        entries: ids.iter().map(|i| entry(*i)).collect(),
    }
}

fn refusal(r: Result<VerifiedDeviceList>) -> DeviceListRefusal {
    match r {
        Err(Error::DeviceList(refusal)) => refusal,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_signed_list_verifies_and_exposes_its_entries() {
    let identity = SigningKey::generate(&mut OsRng);
    let key = identity.verifying_key().to_bytes();
    let l = list(3, &[1, 4]);
    let (bytes, sig) = sign_device_list(&identity, &l).expect("sign");
    let v = VerifiedDeviceList::verify(&key, &account(1), &bytes, &sig, None).expect("verifies");
    assert_eq!(v.version(), 3);
    assert_eq!(v.entries(), &l.entries[..]);
    assert_eq!(v.entry(DeviceId::new(4).expect("id")), Some(&l.entries[1]));
    assert_eq!(v.entry(DeviceId::new(2).expect("id")), None);
    assert_eq!(v.bytes(), &bytes[..]);
    assert_eq!(v.signature(), &sig);
    assert_eq!(v.identity_key(), &key);
    // The same list again, or a newer one, passes the cache.
    assert!(VerifiedDeviceList::verify(&key, &account(1), &bytes, &sig, Some((3, &bytes))).is_ok());
    let (newer, nsig) = sign_device_list(&identity, &list(4, &[1])).expect("sign");
    assert!(
        VerifiedDeviceList::verify(&key, &account(1), &newer, &nsig, Some((3, &bytes))).is_ok()
    );
}

#[test]
fn a_bad_signature_is_refused() {
    let identity = SigningKey::generate(&mut OsRng);
    let key = identity.verifying_key().to_bytes();
    let (bytes, sig) = sign_device_list(&identity, &list(1, &[1, 2])).expect("sign");
    // Signed by another key (a bundle's, a relay's): not the trusted identity.
    let other = SigningKey::generate(&mut OsRng);
    let (_, other_sig) =
        sign_device_list(&other, &DeviceList::parse(&bytes).expect("parse")).expect("sign");
    assert_eq!(
        refusal(VerifiedDeviceList::verify(
            &key,
            &account(1),
            &bytes,
            &other_sig,
            None
        )),
        DeviceListRefusal::BadSignature
    );
    // One list byte changed (a device key swapped in).
    let mut altered = bytes.clone();
    let last = altered.len() - 1;
    altered[last] ^= 1;
    assert_eq!(
        refusal(VerifiedDeviceList::verify(
            &key,
            &account(1),
            &altered,
            &sig,
            None
        )),
        DeviceListRefusal::BadSignature
    );
    assert_eq!(
        refusal(VerifiedDeviceList::verify(
            &key,
            &account(1),
            &bytes,
            &sig[..63],
            None
        )),
        DeviceListRefusal::BadSignature
    );
}

#[test]
fn a_list_for_another_account_is_refused() {
    let identity = SigningKey::generate(&mut OsRng);
    let key = identity.verifying_key().to_bytes();
    let (bytes, sig) = sign_device_list(&identity, &list(1, &[1])).expect("sign");
    assert_eq!(
        refusal(VerifiedDeviceList::verify(
            &key,
            &account(2),
            &bytes,
            &sig,
            None
        )),
        DeviceListRefusal::WrongAccount
    );
}

#[test]
fn an_older_list_or_another_list_of_the_same_version_is_refused() {
    let identity = SigningKey::generate(&mut OsRng);
    let key = identity.verifying_key().to_bytes();
    let (v5, _) = sign_device_list(&identity, &list(5, &[1, 2])).expect("sign");
    let (v4, sig4) = sign_device_list(&identity, &list(4, &[1, 2, 3])).expect("sign");
    assert_eq!(
        refusal(VerifiedDeviceList::verify(
            &key,
            &account(1),
            &v4,
            &sig4,
            Some((5, &v5))
        )),
        DeviceListRefusal::Older { cached: 5, got: 4 }
    );
    // Same version, other devices: the identity signed two lists for one version.
    let (other5, sig_other5) = sign_device_list(&identity, &list(5, &[1, 3])).expect("sign");
    assert_eq!(
        refusal(VerifiedDeviceList::verify(
            &key,
            &account(1),
            &other5,
            &sig_other5,
            Some((5, &v5))
        )),
        DeviceListRefusal::Equivocation { version: 5 }
    );
}

#[test]
fn malformed_bytes_are_refused() {
    let identity = SigningKey::generate(&mut OsRng);
    let key = identity.verifying_key().to_bytes();
    let (bytes, _) = sign_device_list(&identity, &list(1, &[1, 2])).expect("sign");
    for bad in [
        &bytes[..bytes.len() - 1],
        &bytes[1..],
        &[][..],
        &[0u8; 200][..],
    ] {
        let sig = identity.sign(bad).to_bytes();
        assert_eq!(
            refusal(VerifiedDeviceList::verify(
                &key,
                &account(1),
                bad,
                &sig,
                None
            )),
            DeviceListRefusal::Malformed
        );
    }
    // Device 1 missing, ids out of order: not signed here, and refused when signed
    // bytes say so (device 2's id rewritten to 1: a repeated id).
    for ids in [&[2u32, 3][..], &[1, 3, 2]] {
        assert!(matches!(
            sign_device_list(&identity, &list(1, ids)),
            Err(Error::DeviceList(DeviceListRefusal::Malformed))
        ));
    }
    let mut repeated = bytes.clone();
    let second_id = bytes.len() - 68;
    repeated[second_id..second_id + 4].copy_from_slice(&1u32.to_be_bytes());
    let sig = identity.sign(&repeated).to_bytes();
    assert_eq!(
        refusal(VerifiedDeviceList::verify(
            &key,
            &account(1),
            &repeated,
            &sig,
            None
        )),
        DeviceListRefusal::Malformed
    );
}
