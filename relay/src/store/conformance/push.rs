//! Rules every push target store keeps.

use tern_proto::{AccountId, PushTarget};

use super::addr;
use crate::store::PushStore;

/// A gateway target with token `token`.
pub(in crate::store) fn gateway(token: &str) -> PushTarget {
    PushTarget::Gateway {
        url: "https://gw.example/wake".into(),
        device_token: token.into(),
    }
}

/// One target per device, replaced by a put; compare-and-delete; removal by device
/// and by account, leaving other accounts' targets. Leaves no target behind.
pub(in crate::store) fn push_rules(store: &dyn PushStore) {
    let dev = addr(31, 1);
    let second = addr(31, 2);
    let stranger = addr(32, 1);
    let unified = PushTarget::UnifiedPush {
        endpoint: "https://up.example/AbC_12?x=y".into(),
    };
    assert_eq!(store.push_target(&dev).expect("read"), None);
    assert!(!store
        .remove_push_target(&dev, None)
        .expect("remove nothing"));

    store.put_push_target(&dev, &unified).expect("put");
    assert_eq!(
        store.push_target(&dev).expect("read"),
        Some(unified.clone())
    );
    store
        .put_push_target(&dev, &gateway("t1"))
        .expect("replace");
    assert_eq!(store.push_target(&dev).expect("read"), Some(gateway("t1")));
    assert_eq!(
        store.push_target(&second).expect("read"),
        None,
        "per device"
    );

    // A gateway's 404 for an older target leaves the one registered since.
    assert!(!store
        .remove_push_target(&dev, Some(&gateway("t0")))
        .expect("compare"));
    assert!(!store
        .remove_push_target(&dev, Some(&unified))
        .expect("compare"));
    assert_eq!(store.push_target(&dev).expect("read"), Some(gateway("t1")));
    assert!(store
        .remove_push_target(&dev, Some(&gateway("t1")))
        .expect("compare and delete"));
    assert_eq!(store.push_target(&dev).expect("read"), None);

    // By device, then by account.
    store.put_push_target(&dev, &unified).expect("put");
    store.put_push_target(&second, &gateway("t2")).expect("put");
    store
        .put_push_target(&stranger, &gateway("t3"))
        .expect("put");
    assert!(store.remove_push_target(&second, None).expect("remove"));
    assert_eq!(store.push_target(&second).expect("read"), None);
    store.put_push_target(&second, &gateway("t2")).expect("put");
    store
        .remove_account_push_targets(&dev.account)
        .expect("remove account");
    assert_eq!(store.push_target(&dev).expect("read"), None);
    assert_eq!(store.push_target(&second).expect("read"), None);
    assert_eq!(
        store.push_target(&stranger).expect("read"),
        Some(gateway("t3")),
        "another account keeps its target"
    );
    store
        .remove_account_push_targets(&AccountId([99; 16]))
        .expect("an account with none");
    assert!(store.remove_push_target(&stranger, None).expect("clean up"));
}
