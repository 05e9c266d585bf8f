//! Device lists: publishing, listing, and the stale-version check on sends.

use ed25519_dalek::Signer;
use tern_proto::{DeviceAddress, DeviceEntry, DeviceId, DeviceList, SignedDeviceList};

use super::*;
use crate::core::limits::Limits;
use crate::testing::{device, fixture, identity_of, msgs, Fixture};

fn key(n: u8) -> [u8; 32] {
    ed25519_dalek::SigningKey::from_bytes(&[n; 32])
        .verifying_key()
        .to_bytes()
}

/// A list of `entries` (id, device key) for `account`, signed by identity `seed`.
fn list(
    seed: u8,
    account: AccountId,
    version: u64,
    entries: &[(DeviceId, [u8; 32])],
) -> SignedDeviceList {
    let entries = entries
        .iter()
        .map(|&(id, device_key)| DeviceEntry {
            id,
            device_key,
            identity_dh: [9; 32],
        })
        .collect();
    let bytes = DeviceList {
        account,
        version,
        entries,
    }
    .encode()
    .expect("valid");
    let signature = identity_of(seed).sign(&bytes).to_bytes();
    SignedDeviceList::parse(bytes.into(), &signature).expect("parses")
}

fn record(f: &Fixture, account: &AccountId) -> Vec<(DeviceId, [u8; 32])> {
    f.store.get(account).expect("get").expect("account").devices
}

#[tokio::test]
async fn a_list_is_stored_only_if_signed_newer_and_naming_the_accounts_devices() {
    let f = fixture(Limits::default());
    let alice = device(&f, 1).await;
    let account = alice.address().account;
    f.add_device(&alice, 1, key(60)).await.expect("linked");
    let devices = record(&f, &account);
    let accounts = f.services.accounts();
    let by = &alice;
    let publish = |l: SignedDeviceList| async move { accounts.publish_device_list(by, &l).await };

    let forged = list(9, account, 1, &devices);
    assert!(matches!(publish(forged).await, Err(Error::Unauthorized)));
    let other_key = [(devices[0].0, devices[0].1), (devices[1].0, key(61))];
    let wrong = publish(list(1, account, 1, &other_key)).await;
    assert!(matches!(wrong, Err(Error::BadRequest(_))), "{wrong:?}");
    let unknown = [devices[0], (DeviceId::new(7).expect("7"), key(60))];
    let unknown = publish(list(1, account, 1, &unknown)).await;
    assert!(matches!(unknown, Err(Error::BadRequest(_))), "{unknown:?}");
    let elsewhere = publish(list(1, AccountId([3; 16]), 1, &devices)).await;
    assert!(
        matches!(elsewhere, Err(Error::BadRequest(_))),
        "{elsewhere:?}"
    );

    let v2 = list(1, account, 2, &devices);
    publish(v2.clone()).await.expect("published");
    // Only a newer version replaces it.
    let older = publish(list(1, account, 1, &devices[..1])).await;
    assert!(matches!(older, Err(Error::StaleDeviceList)), "{older:?}");
    let same = publish(list(1, account, 2, &devices[..1])).await;
    assert!(matches!(same, Err(Error::StaleDeviceList)), "{same:?}");

    f.set_token(&alice, &[4; 32]).await;
    let listing = accounts.list_devices(&account, &[4; 32]).expect("list");
    assert_eq!(listing.devices, vec![DeviceId::PRIMARY, devices[1].0]);
    let stored = listing.list.expect("a list");
    assert_eq!(
        (stored.version, stored.list, stored.signature),
        (2, v2.bytes.to_vec(), v2.signature)
    );
    assert!(matches!(
        accounts.list_devices(&account, &[5; 32]),
        Err(Error::Unauthorized)
    ));
}

#[tokio::test]
async fn a_send_with_an_older_list_version_is_refused_as_stale() {
    let f = fixture(Limits::default());
    let (alice, bob) = (device(&f, 1).await, device(&f, 2).await);
    let account = bob.address().account;
    let to = *bob.address();
    let accounts = f.services.accounts();
    f.set_token(&bob, &[4; 32]).await;
    let from = AddressPrefix::from(std::net::IpAddr::from([10, 0, 0, 1]));
    // No list published: every version passes.
    assert!(accounts.listed_recipient(&alice, to, 5).is_ok());
    let devices = record(&f, &account);
    let v3 = list(2, account, 3, &devices);
    accounts
        .publish_device_list(&bob, &v3)
        .await
        .expect("published");
    let stale = |r: Result<Recipient>| matches!(r, Err(Error::StaleDeviceList));
    assert!(stale(accounts.listed_recipient(&alice, to, 2)));
    assert!(stale(
        accounts.listed_sealed_recipient(to, &[4; 32], from, 2)
    ));
    assert!(accounts.listed_recipient(&alice, to, 3).is_ok());
    assert!(
        accounts.listed_recipient(&alice, to, 0).is_ok(),
        "0: unchecked"
    );
    assert!(accounts
        .listed_sealed_recipient(to, &[4; 32], from, 4)
        .is_ok());
    // A wrong token is refused as before, whatever the version: the version says
    // nothing to someone without the token.
    assert!(matches!(
        accounts.listed_sealed_recipient(to, &[5; 32], from, 1),
        Err(Error::Unauthorized)
    ));
    // A stale send names a device the list no longer has: stale first.
    let gone = DeviceAddress {
        account,
        device: DeviceId::new(9).expect("9"),
    };
    assert!(stale(accounts.listed_recipient(&alice, gone, 1)));
    assert!(matches!(
        accounts.listed_recipient(&alice, gone, 3),
        Err(Error::UnknownRecipient)
    ));
    let to_bob = accounts.listed_recipient(&alice, to, 3).expect("recipient");
    let queued = f.services.mailboxes().append(&to_bob, &msgs(0..1, 8));
    assert_eq!(queued.expect("append").commit().await.expect("commit"), 1);
}
