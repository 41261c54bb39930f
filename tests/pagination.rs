//! Cursor pagination of keys, tokens and accounts: default and maximum page sizes, opaque
//! cursors bound to their listing, stable order while keys come and go.

mod common;

use std::collections::BTreeSet;

use common::*;
use keyledger::{DEFAULT_LIMIT, Ledger, MAX_LIMIT, NewKey, PageRequest, PublicId};

fn create_keys(t: &TestLedger, owner: &str, n: usize) -> Vec<PublicId> {
    (0..n)
        .map(|i| t.key(owner, &format!("key {i}")).0.id)
        .collect()
}

fn ids(items: &[keyledger::KeyInfo]) -> Vec<PublicId> {
    items.iter().map(|k| k.id).collect()
}

/// Walks every page of `owner`'s keys with `limit`, returning the pages' ids.
fn walk(ledger: &Ledger, owner: &str, limit: usize) -> Vec<Vec<PublicId>> {
    let mut pages = Vec::new();
    let mut request = PageRequest::first().limit(limit);
    loop {
        let page = ledger.keys().list(owner, &request).unwrap();
        assert!(page.items.len() <= limit);
        pages.push(ids(&page.items));
        match page.next_cursor {
            Some(c) => request = PageRequest::first().limit(limit).after(c),
            None => return pages,
        }
    }
}

#[test]
fn default_and_maximum_page_sizes() {
    assert_eq!((DEFAULT_LIMIT, MAX_LIMIT), (25, 100));
    let t = TestLedger::new();
    let owner = t.account("Big");
    let created = create_keys(&t, &owner, 130);

    let first = t.ledger.keys().list(&owner, &PageRequest::first()).unwrap();
    assert_eq!(
        ids(&first.items),
        created[..25],
        "25 by default, in creation order"
    );
    let cursor = first.next_cursor.expect("more pages");

    let max = t
        .ledger
        .keys()
        .list(&owner, &PageRequest::first().limit(100))
        .unwrap();
    assert_eq!(ids(&max.items), created[..100]);
    let rest = PageRequest::first()
        .limit(100)
        .after(max.next_cursor.unwrap());
    let rest = t.ledger.keys().list(&owner, &rest).unwrap();
    assert_eq!(ids(&rest.items), created[100..]);
    assert_eq!(rest.next_cursor, None);

    // The default-size walk covers everything exactly once.
    let second = t
        .ledger
        .keys()
        .list(&owner, &PageRequest::first().after(cursor))
        .unwrap();
    assert_eq!(ids(&second.items), created[25..50]);
    let pages = walk(&t.ledger, &owner, 25);
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        [25, 25, 25, 25, 25, 5]
    );
    assert_eq!(pages.concat(), created);
}

#[test]
fn an_exact_multiple_ends_without_an_empty_page() {
    let t = TestLedger::new();
    let owner = t.account("Acme");
    let created = create_keys(&t, &owner, 10);
    let pages = walk(&t.ledger, &owner, 5);
    assert_eq!(pages, [created[..5].to_vec(), created[5..].to_vec()]);
    let one_page = walk(&t.ledger, &owner, 10);
    assert_eq!(one_page, std::slice::from_ref(&created));
    assert_eq!(walk(&t.ledger, &owner, 1).len(), 10);

    let empty = t.account("Empty");
    let page = t.ledger.keys().list(&empty, &PageRequest::first()).unwrap();
    assert!(page.items.is_empty());
    assert_eq!(page.next_cursor, None);
}

#[test]
fn keys_created_or_deleted_while_paging_are_never_listed_twice() {
    let t = TestLedger::new();
    let owner = t.account("Acme");
    let mut created = create_keys(&t, &owner, 7);

    let first = t
        .ledger
        .keys()
        .list(&owner, &PageRequest::first().limit(3))
        .unwrap();
    assert_eq!(ids(&first.items), created[..3]);
    // Meanwhile: the last listed key is deleted, an unseen one too, and new ones are created.
    t.ledger.keys().delete(&created[2]).unwrap();
    t.ledger.keys().delete(&created[4]).unwrap();
    created.extend(create_keys(&t, &owner, 2));

    let mut seen: Vec<PublicId> = ids(&first.items);
    let mut cursor = first.next_cursor;
    while let Some(c) = cursor {
        let page = t
            .ledger
            .keys()
            .list(&owner, &PageRequest::first().limit(3).after(c))
            .unwrap();
        seen.extend(ids(&page.items));
        cursor = page.next_cursor;
    }
    let unique: BTreeSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no key twice");
    let expected: Vec<_> = created
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 4)
        .map(|(_, id)| *id)
        .collect();
    assert_eq!(
        seen, expected,
        "keys created while paging appear on later pages"
    );
}

#[test]
fn keys_and_tokens_and_owners_are_listed_separately() {
    let t = TestLedger::new();
    let a = t.account("A");
    let b = t.account("B");
    let a_keys = create_keys(&t, &a, 3);
    let b_keys = create_keys(&t, &b, 2);
    let a_tokens: Vec<_> = (0..4)
        .map(|i| {
            t.ledger
                .tokens()
                .create(NewKey::token(a, "svc", format!("t{i}")))
                .unwrap()
                .info
                .id
        })
        .collect();

    assert_eq!(walk(&t.ledger, &a, 2).concat(), a_keys);
    assert_eq!(walk(&t.ledger, &b, 2).concat(), b_keys);
    let tokens = t
        .ledger
        .tokens()
        .list(&a, &PageRequest::first().limit(3))
        .unwrap();
    assert_eq!(ids(&tokens.items), a_tokens[..3]);
    let more = PageRequest::first()
        .limit(3)
        .after(tokens.next_cursor.clone().unwrap());
    assert_eq!(
        ids(&t.ledger.tokens().list(&a, &more).unwrap().items),
        a_tokens[3..]
    );
    assert!(
        t.ledger
            .tokens()
            .list(&b, &PageRequest::first())
            .unwrap()
            .items
            .is_empty()
    );

    // A cursor belongs to its listing: another owner's, or keys' instead of tokens'.
    let a_cursor = t
        .ledger
        .keys()
        .list(&a, &PageRequest::first().limit(1))
        .unwrap()
        .next_cursor;
    let a_cursor = a_cursor.unwrap();
    let before = snapshot(&t.ledger);
    assert_invalid(
        t.ledger
            .keys()
            .list(&b, &PageRequest::first().after(&a_cursor)),
        "cursor",
    );
    assert_invalid(
        t.ledger
            .tokens()
            .list(&a, &PageRequest::first().after(&a_cursor)),
        "cursor",
    );
    let token_cursor = tokens.next_cursor.unwrap();
    assert_invalid(
        t.ledger
            .keys()
            .list(&a, &PageRequest::first().after(&token_cursor)),
        "cursor",
    );
    let accounts_cursor = t
        .ledger
        .accounts()
        .list(&PageRequest::first().limit(1))
        .unwrap();
    let accounts_cursor = accounts_cursor.next_cursor.unwrap();
    assert_invalid(
        t.ledger
            .keys()
            .list(&a, &PageRequest::first().after(&accounts_cursor)),
        "cursor",
    );
    assert_invalid(
        t.ledger
            .accounts()
            .list(&PageRequest::first().after(&a_cursor)),
        "cursor",
    );
    assert_eq!(snapshot(&t.ledger), before);
}

#[test]
fn forged_and_foreign_cursors_are_refused() {
    let t = TestLedger::new();
    let owner = t.account("Acme");
    create_keys(&t, &owner, 3);
    let cursor = t
        .ledger
        .keys()
        .list(&owner, &PageRequest::first().limit(1))
        .unwrap();
    let cursor = cursor.next_cursor.unwrap();
    assert!(!cursor.contains(&owner[5..]), "opaque");

    let list = |c: &str| t.ledger.keys().list(&owner, &PageRequest::first().after(c));
    assert!(list(&cursor).is_ok());
    let mut flipped = cursor.clone().into_bytes();
    flipped[5] = if flipped[5] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    for bad in [
        "",
        "0",
        "not a cursor",
        &cursor[..cursor.len() - 1],
        &format!("{cursor}A"),
        &flipped,
        &"A".repeat(cursor.len()),
        "🙂🙂🙂🙂🙂🙂🙂🙂",
    ] {
        assert_invalid(list(bad), "cursor");
    }

    // A cursor from another ledger (another master key) means nothing here.
    let other = TestLedger::new();
    let other_owner = other.account("Other");
    create_keys(&other, &other_owner, 2);
    let foreign = other
        .ledger
        .keys()
        .list(&other_owner, &PageRequest::first().limit(1))
        .unwrap();
    assert_invalid(list(&foreign.next_cursor.unwrap()), "cursor");
}

#[test]
fn cursors_survive_a_reopen() {
    let t = TestLedger::new();
    let owner = t.account("Acme");
    let created = create_keys(&t, &owner, 4);
    let first = t
        .ledger
        .keys()
        .list(&owner, &PageRequest::first().limit(2))
        .unwrap();
    let cursor = first.next_cursor.unwrap();
    let t = t.reopen();
    let second = t
        .ledger
        .keys()
        .list(&owner, &PageRequest::first().limit(2).after(cursor))
        .unwrap();
    assert_eq!(ids(&second.items), created[2..]);
}

#[test]
fn page_sizes_outside_1_to_100_are_refused() {
    let t = TestLedger::new();
    let owner = t.account("Acme");
    create_keys(&t, &owner, 2);
    for limit in [0, 101, usize::MAX] {
        let request = PageRequest::first().limit(limit);
        assert_invalid(t.ledger.keys().list(&owner, &request), "limit");
        assert_invalid(t.ledger.tokens().list(&owner, &request), "limit");
        assert_invalid(t.ledger.accounts().list(&request), "limit");
    }
    assert_eq!(
        t.ledger
            .keys()
            .list(&owner, &PageRequest::first().limit(1))
            .unwrap()
            .items
            .len(),
        1
    );
    let err = t
        .ledger
        .keys()
        .list(&owner, &PageRequest::first().limit(101))
        .unwrap_err();
    assert!(
        err.to_string().contains("100"),
        "says what is allowed: {err}"
    );
}

#[test]
fn accounts_page_through_in_creation_order() {
    let t = TestLedger::new();
    let created: Vec<_> = (0..12).map(|i| t.account(&format!("acct {i}"))).collect();
    let mut seen = Vec::new();
    let mut request = PageRequest::first().limit(5);
    loop {
        let page = t.ledger.accounts().list(&request).unwrap();
        seen.extend(page.items.into_iter().map(|a| a.id));
        match page.next_cursor {
            Some(c) => request = PageRequest::first().limit(5).after(c),
            None => break,
        }
    }
    assert_eq!(seen, created);
    let all = t.ledger.accounts().list(&PageRequest::first()).unwrap();
    assert_eq!(all.items.len(), 12);
    assert_eq!(all.next_cursor, None);
}
