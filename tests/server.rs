//! End to end over real HTTP: the example server (`examples/server`) runs in-process on an
//! ephemeral loopback port, and every route is driven through a plain TCP client.

#[path = "../examples/server/app/mod.rs"]
mod app;
mod server_support;

use keyledger::{
    AccountUpdate, Clock, NewAccount, NewKey, OAuthGrant, Provider, Secret, SubscriptionStatus,
};
use serde_json::{Value, json};

use app::AuthMode;
use server_support::{Response, Server};

const QUICKHIT: &str = r#"{"prompt":"Explain photosynthesis"}"#;

/// The generation routes: path, a minimal valid body, resource id prefix, credits per call.
const ROUTES: [(&str, &str, &str, u64); 4] = [
    ("/api/v1/quickhits/create", QUICKHIT, "qh_", 1),
    (
        "/api/v1/roadmaps/create",
        r#"{"prompt":"Learn Rust"}"#,
        "rm_",
        3,
    ),
    (
        "/api/v1/quizzes/create",
        r#"{"prompt":"World capitals"}"#,
        "quiz_",
        2,
    ),
    (
        "/api/v1/projects/create",
        r#"{"prompt":"Build a weather station"}"#,
        "proj_",
        5,
    ),
];

fn field<'a>(v: &'a Value, name: &str) -> &'a Value {
    v.get(name)
        .unwrap_or_else(|| panic!("missing `{name}` in {v}"))
}

/// The generation envelope: exactly its seven fields.
fn envelope(r: &Response) -> Value {
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{}",
        r.body
    );
    let v = r.json();
    let mut keys: Vec<&str> = v
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "data",
            "error",
            "id",
            "message",
            "pricing",
            "success",
            "token_stats"
        ],
        "{v}"
    );
    v
}

/// The management envelope: exactly its four fields.
fn managed(r: &Response) -> Value {
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{}",
        r.body
    );
    let v = r.json();
    let mut keys: Vec<&str> = v
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["errors", "links", "result", "success"], "{v}");
    v
}

/// A refusal in the generation envelope: status, code, and a `req_` id.
fn refused(r: &Response, status: u16, code: &str) -> Value {
    assert_eq!(r.status, status, "{}", r.body);
    let v = envelope(r);
    assert_eq!(v["success"], false);
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    assert!(v["id"].as_str().is_some_and(|id| id.starts_with("req_")));
    assert!(v["data"].is_null() && v["token_stats"].is_null() && v["pricing"].is_null());
    v
}

/// A refusal in the management envelope.
fn managed_refused(r: &Response, status: u16, code: &str) -> Value {
    assert_eq!(r.status, status, "{}", r.body);
    let v = managed(r);
    assert_eq!(v["success"], false);
    assert!(v["result"].is_null() && v["links"].is_null());
    assert_eq!(v["errors"][0]["code"], code, "{v}");
    v
}

/// An opaque id: `prefix` + at least 22 base64url characters (128 bits; the library's own
/// ids are longer).
fn assert_opaque(id: &str, prefix: &str) {
    let rest = id
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("{id} lacks {prefix}"));
    assert!(rest.len() >= 22, "{id}");
    assert!(
        rest.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );
}

/// Creates a key with `new` for a test (through the library) and returns its plaintext.
fn key(server: &Server, new: NewKey) -> String {
    let created = server.ledger.keys().create(new).expect("create key");
    created.plaintext.expose().to_owned()
}

#[test]
fn generation_routes_answer_in_the_envelope_with_receipts() {
    let s = Server::start();
    let mut ids = Vec::new();
    for (path, body, prefix, cost) in ROUTES {
        let r = s.json("POST", path, &s.admin, body);
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        let v = envelope(&r);
        assert_eq!(v["success"], true);
        assert!(v["error"].is_null());
        assert!(!v["message"].as_str().unwrap_or("").is_empty());
        let id = v["id"].as_str().expect("id");
        assert_opaque(id, prefix);
        ids.push(id.to_owned());
        let stats = field(&v, "token_stats");
        assert_eq!(stats["used"], cost);
        assert_eq!(stats["charged"], cost);
        assert_eq!(stats["uncovered"], 0);
        let pricing = field(&v, "pricing");
        assert_eq!(pricing["units"], cost);
        assert_eq!(pricing["unit_price_micros"], 2_000);
        assert_eq!(pricing["total_micros"], cost * 2_000);
    }
    // The same request twice: the same placeholder, a new opaque id.
    let a = s.json("POST", ROUTES[0].0, &s.admin, QUICKHIT).json();
    let b = s.json("POST", ROUTES[0].0, &s.admin, QUICKHIT).json();
    assert_eq!(a["data"], b["data"]);
    assert_ne!(a["id"], b["id"]);
    ids.extend([a["id"].to_string(), b["id"].to_string()]);
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), ROUTES.len() + 2);

    // Defaults and field shapes.
    let qh = &a["data"];
    assert_eq!(qh["mode"], "broad");
    assert_eq!(qh["title"], "Explain photosynthesis");
    let narrow = s.json(
        "POST",
        "/api/v1/quickhits/create",
        &s.admin,
        r#"{"prompt":"Cells","mode":"narrow","context":[{"type":"text","content":"Mitochondria"},
            {"type":"pdf","id":"doc_12"},{"type":"vidbyte_project","id":"vp-1"}]}"#,
    );
    let v = envelope(&narrow);
    assert_eq!(v["data"]["mode"], "narrow", "{v}");
    assert_eq!(
        v["data"]["context_types"],
        json!(["text", "pdf", "vidbyte_project"])
    );

    let rm = s
        .json("POST", "/api/v1/roadmaps/create", &s.admin, ROUTES[1].1)
        .json();
    assert_eq!(rm["data"]["timeline"], "3 months");
    assert_eq!(rm["data"]["experience"], json!([]));
    for (experience, expected) in [
        (json!("beginner"), json!(["beginner"])),
        (json!(["python", "sql"]), json!(["python", "sql"])),
    ] {
        let body = json!({"prompt": "Data", "experience": experience, "timeline": "6 weeks",
            "resource_preference": "videos", "additional_info": "evenings"});
        let v = s
            .json(
                "POST",
                "/api/v1/roadmaps/create",
                &s.admin,
                &body.to_string(),
            )
            .json();
        assert_eq!(v["data"]["experience"], expected, "{v}");
        assert_eq!(v["data"]["timeline"], "6 weeks");
    }

    let quiz = s
        .json("POST", "/api/v1/quizzes/create", &s.admin, ROUTES[2].1)
        .json();
    assert_eq!(quiz["data"]["quiz_type"], "multiple_choice");
    assert_eq!(quiz["data"]["questions"].as_array().map(Vec::len), Some(10));
    let body = json!({"title": "Capitals", "content": "Paris is the capital of France.",
        "quiz_type": "true_false", "reasoning_lens": "recall", "difficulty": "easy",
        "length": 3, "assessment_intent": "practice", "explanation_length": "short",
        "question_style": "direct", "content_focus": "facts"});
    let quiz = s
        .json(
            "POST",
            "/api/v1/quizzes/create",
            &s.admin,
            &body.to_string(),
        )
        .json();
    assert_eq!(
        quiz["data"]["questions"].as_array().map(Vec::len),
        Some(3),
        "{quiz}"
    );
    assert_eq!(quiz["data"]["quiz_type"], "true_false");
    assert_eq!(quiz["data"]["title"], "Capitals");

    let body = json!({"prompt": "Robot arm", "project_goal": "pick up a cup",
        "why_this_matters": "fun", "current_level": "beginner", "depth_preference": "deep",
        "guidance_level": "high", "context": [{"type": "project", "id": "proj_1"}]});
    let project = s.json(
        "POST",
        "/api/v1/projects/create",
        &s.admin,
        &body.to_string(),
    );
    assert_eq!(project.status, 200, "{}", project.body);
    assert_eq!(project.json()["data"]["goal"], "pick up a cup");

    // `x-api-key` works as well as Bearer.
    let r = s.send(
        "POST",
        "/api/v1/quickhits/create",
        &[
            ("x-api-key", &s.admin),
            ("content-type", "application/json; charset=utf-8"),
        ],
        Some(QUICKHIT),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    s.assert_no_secrets(&[]);
}

#[test]
fn validation_errors_are_400_and_json_is_required() {
    let s = Server::start();
    let q = "/api/v1/quickhits/create";
    let cases: [(&str, &str, &str); 13] = [
        (q, r#"{}"#, "prompt"),
        (q, r#"{"prompt":"  "}"#, "prompt"),
        (q, r#"{"prompt":"x","mode":"wide"}"#, "broad"),
        (q, r#"{"prompt":"x","promt":"typo"}"#, "promt"),
        (
            q,
            r#"{"prompt":"x","context":[{"type":"video","id":"v"}]}"#,
            "video",
        ),
        (
            q,
            r#"{"prompt":"x","context":[{"type":"text"}]}"#,
            "content",
        ),
        (
            q,
            r#"{"prompt":"x","context":[{"type":"doc","id":"a b"}]}"#,
            "context[0].id",
        ),
        (q, r#"{"prompt": "#, "invalid request body"),
        (
            "/api/v1/roadmaps/create",
            r#"{"prompt":"x","experience":3}"#,
            "experience",
        ),
        (
            "/api/v1/quizzes/create",
            r#"{"title":"only a title"}"#,
            "prompt, content or context",
        ),
        (
            "/api/v1/quizzes/create",
            r#"{"prompt":"x","length":0}"#,
            "length",
        ),
        (
            "/api/v1/quizzes/create",
            r#"{"prompt":"x","quiz_type":"essay"}"#,
            "multiple_choice",
        ),
        (
            "/api/v1/projects/create",
            r#"{"project_goal":"x"}"#,
            "prompt",
        ),
    ];
    for (path, body, mentions) in cases {
        let r = s.json("POST", path, &s.admin, body);
        let v = refused(&r, 400, "invalid_request");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(mentions), "{body}: {message}");
        assert_eq!(v["message"], v["error"]["message"]);
    }
    // Content-Type: application/json is required.
    let auth = format!("Bearer {}", s.admin);
    let not_json = [
        "text/plain",
        "application/jsonx",
        "application/+json",
        "text/x+json",
    ];
    for content_type in std::iter::once(None).chain(not_json.map(Some)) {
        let mut headers = vec![("authorization", auth.as_str())];
        headers.extend(content_type.map(|c| ("content-type", c)));
        let r = s.send("POST", q, &headers, Some(QUICKHIT));
        refused(&r, 415, "unsupported_media_type");
    }
    // Or a JSON type by its suffix (RFC 6839; found by a reviewer), any case, with a charset.
    for content_type in [
        "application/vnd.api+json",
        "Application/Problem+JSON; charset=utf-8",
    ] {
        let headers = [
            ("authorization", auth.as_str()),
            ("content-type", content_type),
        ];
        let r = s.send("POST", q, &headers, Some(QUICKHIT));
        assert_eq!(r.status, 200, "{content_type}: {}", r.body);
    }
    // Unknown routes and methods answer in the envelope too, without needing a key.
    refused(
        &s.send("GET", "/api/v1/nothing", &[], None),
        404,
        "not_found",
    );
    refused(&s.send("GET", q, &[], None), 405, "method_not_allowed");
    managed_refused(&s.send("GET", "/v2/nothing", &[], None), 404, "not_found");
    s.assert_no_secrets(&[]);
}

#[test]
fn every_denial_has_its_status_code_and_a_safe_body() {
    let s = Server::start();
    let q = "/api/v1/quickhits/create";
    let post = |key: &str| s.json("POST", q, key, QUICKHIT);
    let mut presented: Vec<String> = Vec::new();

    // Header problems.
    let r = s.send(
        "POST",
        q,
        &[("content-type", "application/json")],
        Some(QUICKHIT),
    );
    refused(&r, 401, "missing_key");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = s.send(
        "POST",
        q,
        &[("authorization", "Basic dXNlcjpwYXNz")],
        Some(QUICKHIT),
    );
    refused(&r, 401, "unsupported_scheme");
    let other = key(
        &s,
        NewKey::new(s.account.as_str(), "other").permissions(["*"]),
    );
    let bearer = format!("Bearer {}", s.admin);
    let r = s.send(
        "POST",
        q,
        &[("authorization", &bearer), ("x-api-key", &other)],
        None,
    );
    refused(&r, 400, "conflicting_keys");
    // The same header twice with two keys: a proxy reading the last would charge the other.
    // (Found by a reviewer: the first was served.)
    let other_bearer = format!("Bearer {other}");
    for twice in [
        [
            ("x-api-key", s.admin.as_str()),
            ("x-api-key", other.as_str()),
        ],
        [("authorization", &bearer), ("authorization", &other_bearer)],
    ] {
        refused(&s.send("POST", q, &twice, None), 400, "conflicting_keys");
    }
    // One key sent twice, the scheme's case aside, is one key. (Found by a reviewer: it was
    // refused as two.)
    let lower = format!("bearer {}", s.admin);
    let same = [
        ("authorization", bearer.as_str()),
        ("authorization", &lower),
        ("content-type", "application/json"),
    ];
    let r = s.send("POST", q, &same, Some(QUICKHIT));
    assert_eq!(r.status, 200, "{}", r.body);
    // A proxy's `Basic` credentials, repeated, next to `x-api-key`: still ignored.
    let basic = [
        ("authorization", "Basic dXNlcjpwYXNz"),
        ("authorization", "Basic dXNlcjpwYXNz"),
        ("x-api-key", s.admin.as_str()),
    ];
    assert_ne!(s.send("POST", q, &basic, None).status, 401);
    presented.push(other.clone());

    // malformed: a mistyped key fails its checksum before any hashing.
    let mut typo = other.clone();
    let last = typo.pop().expect("char");
    typo.push(if last == 'a' { 'b' } else { 'a' });
    refused(&post(&typo), 401, "malformed");
    refused(&post("vb_live_short"), 401, "malformed");
    presented.push(typo);

    // not_found: well-formed, but deleted.
    let gone = s
        .ledger
        .keys()
        .create(NewKey::new(s.account.as_str(), "gone"))
        .expect("key");
    s.ledger.keys().delete(&gone.info.id).expect("delete");
    let gone = gone.plaintext.expose().to_owned();
    refused(&post(&gone), 401, "not_found");
    presented.push(gone);

    // disabled.
    let created = s
        .ledger
        .keys()
        .create(NewKey::new(s.account.as_str(), "off").permissions(["*"]));
    let created = created.expect("key");
    s.ledger.keys().disable(&created.info.id).expect("disable");
    let disabled = created.plaintext.expose().to_owned();
    refused(&post(&disabled), 401, "disabled");
    presented.push(disabled);

    // forbidden: the route needs `quickhits:create`.
    let narrow = key(
        &s,
        NewKey::new(s.account.as_str(), "quiz only").permissions(["quizzes:*"]),
    );
    refused(&post(&narrow), 403, "forbidden");
    let r = s.json("POST", "/api/v1/quizzes/create", &narrow, ROUTES[2].1);
    assert_eq!(r.status, 200, "{}", r.body);
    presented.push(narrow);

    // ip_not_allowed: the test connects from 127.0.0.1.
    let ips = key(
        &s,
        NewKey::new(s.account.as_str(), "office")
            .permissions(["*"])
            .ips(["10.1.2.0/24"]),
    );
    refused(&post(&ips), 403, "ip_not_allowed");
    let local = key(
        &s,
        NewKey::new(s.account.as_str(), "local")
            .permissions(["*"])
            .ips(["127.0.0.1"]),
    );
    assert_eq!(post(&local).status, 200);
    presented.extend([ips, local]);

    // subscription_inactive and not_entitled: a second account.
    let acme = s
        .ledger
        .accounts()
        .create(NewAccount::new("Acme"))
        .expect("account");
    let acme_key = key(&s, NewKey::new(acme.id.as_str(), "acme").permissions(["*"]));
    assert_eq!(post(&acme_key).status, 200);
    let r = s.json("POST", "/api/v1/projects/create", &acme_key, ROUTES[3].1);
    refused(&r, 403, "not_entitled");
    s.ledger
        .accounts()
        .update(
            &acme.id,
            AccountUpdate::new().status(SubscriptionStatus::Canceled),
        )
        .expect("cancel");
    refused(&post(&acme_key), 402, "subscription_inactive");
    // The management surface refuses in its own envelope.
    managed_refused(
        &s.get("GET", "/v2/keys", &acme_key),
        402,
        "subscription_inactive",
    );
    presented.push(acme_key);

    // rate_limited, with Retry-After.
    let limited = key(
        &s,
        NewKey::new(s.account.as_str(), "slow")
            .permissions(["*"])
            .rate_limit("requests", 1, 60),
    );
    assert_eq!(post(&limited).status, 200);
    let r = post(&limited);
    refused(&r, 429, "rate_limited");
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=60).contains(&retry), "{retry}");
    s.clock.advance_secs(retry);
    assert_eq!(
        post(&limited).status,
        200,
        "allowed again after Retry-After"
    );
    presented.push(limited);

    // usage_exceeded: a roadmap costs 3.
    let poor = key(
        &s,
        NewKey::new(s.account.as_str(), "poor")
            .permissions(["*"])
            .credits(2),
    );
    refused(
        &s.json("POST", "/api/v1/roadmaps/create", &poor, ROUTES[1].1),
        402,
        "usage_exceeded",
    );
    assert_eq!(post(&poor).status, 200, "a 1-credit quick hit still fits");
    presented.push(poor);

    // expired (last: it moves the clock a day on).
    let soon = s.clock.now().plus_secs(60);
    let expiring = key(
        &s,
        NewKey::new(s.account.as_str(), "temp")
            .permissions(["*"])
            .expires_at(soon),
    );
    assert_eq!(post(&expiring).status, 200);
    s.clock.advance_secs(86_400);
    refused(&post(&expiring), 401, "expired");
    presented.push(expiring);

    let presented: Vec<&str> = presented.iter().map(String::as_str).collect();
    s.assert_no_secrets(&presented);
}

#[test]
fn unavailable_store_is_503_and_charges_nothing() {
    let s = Server::start();
    let metered = key(
        &s,
        NewKey::new(s.account.as_str(), "metered")
            .permissions(["*"])
            .credits(10),
    );
    // A closed ledger's writer can no longer lease credits: verify says `unavailable`.
    s.ledger.close().expect("close");
    let r = s.json("POST", "/api/v1/quickhits/create", &metered, QUICKHIT);
    refused(&r, 503, "unavailable");
    s.assert_no_secrets(&[&metered]);
}

#[test]
fn credits_are_spent_only_on_successful_requests() {
    let s = Server::start();
    let q = "/api/v1/quickhits/create";
    let k = key(
        &s,
        NewKey::new(s.account.as_str(), "three")
            .permissions(["*"])
            .credits(3),
    );
    let auth = format!("Bearer {k}");
    let balance = |s: &Server| {
        let info = s.ledger.keys().find_by_prefix(&k[..12]).expect("find");
        info[0].remaining_credits
    };
    // Failures before the handler succeeds: 400 (bad body), 415 (no JSON), 404 route-level
    // failures never reach auth; a denial for another route (forbidden here: none) — none
    // of them may cost a credit.
    for _ in 0..3 {
        refused(
            &s.json("POST", q, &k, r#"{"prompt":""}"#),
            400,
            "invalid_request",
        );
        let r = s.send("POST", q, &[("authorization", &auth)], Some(QUICKHIT));
        refused(&r, 415, "unsupported_media_type");
    }
    assert_eq!(balance(&s), Some(3));
    for left in [2u64, 1, 0] {
        let r = s.json("POST", q, &k, QUICKHIT);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["token_stats"]["remaining_credits"], left);
    }
    refused(&s.json("POST", q, &k, QUICKHIT), 402, "usage_exceeded");
    let usage = s
        .ledger
        .credits()
        .usage(&s.ledger.keys().find_by_prefix(&k[..12]).expect("find")[0].id);
    let usage = usage.expect("usage");
    assert_eq!(usage.remaining, Some(0));
    assert_eq!(usage.lifetime_spent, 3);

    // The admin key spends the account's pool: only successes move it.
    let pool = |s: &Server| s.ledger.credits().pool(&s.pool).expect("pool").remaining;
    let before = pool(&s);
    let mut spent = 0;
    for (path, body, _, cost) in ROUTES {
        assert_eq!(s.json("POST", path, &s.admin, body).status, 200);
        spent += cost;
        refused(
            &s.json("POST", path, &s.admin, "{\"nope\":1}"),
            400,
            "invalid_request",
        );
    }
    assert_eq!(pool(&s), before - spent);
    s.assert_no_secrets(&[&k]);
}

/// Creates a key over HTTP and returns (id, value, response).
fn create_key(s: &Server, path: &str, by: &str, body: Value) -> (String, String, Value) {
    let r = s.json("POST", path, by, &body.to_string());
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let v = managed(&r);
    assert_eq!(v["success"], true);
    assert_eq!(v["errors"], json!([]));
    let result = &v["result"];
    let id = result["id"].as_str().expect("id").to_owned();
    assert_eq!(v["links"]["self"], format!("{path}/{id}"));
    let value = result["value"].as_str().expect("value").to_owned();
    (id, value, result.clone())
}

fn assert_key_fields(result: &Value, with_value: bool) {
    let mut keys: Vec<&str> = result
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    let mut expected = vec![
        "created_by",
        "created_time",
        "id",
        "ips",
        "name",
        "permissions",
        "type",
        "updated_by",
        "updated_time",
    ];
    if with_value {
        expected.push("value");
        expected.sort_unstable();
    }
    assert_eq!(keys, expected, "{result}");
    let time = result["created_time"].as_str().expect("time");
    assert!(
        time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
        "{time}"
    );
}

#[test]
fn key_management_lifecycle_read_only_keys_and_revocation() {
    let s = Server::start();
    let (id, value, result) = create_key(
        &s,
        "/v2/keys",
        &s.admin,
        json!({"type": "api", "name": "CI deploy", "permissions": [], "ips": []}),
    );
    assert_key_fields(&result, true);
    assert_opaque(&id, "key_");
    assert!(value.starts_with("vb_live_"));
    assert_eq!(result["name"], "CI deploy");
    assert_eq!(result["type"], "api");
    assert_eq!(result["permissions"], json!([]));
    assert_eq!(result["created_by"], s.admin_id.as_str());
    assert_eq!(result["updated_by"], s.admin_id.as_str());

    // The value is shown once: never by get or list.
    let got = s.get("GET", &format!("/v2/keys/{id}"), &s.admin);
    assert_eq!(got.status, 200);
    let got = managed(&got);
    assert_key_fields(&got["result"], false);
    assert_eq!(got["result"]["id"], id.as_str());
    let listed = managed(&s.get("GET", "/v2/keys", &s.admin));
    let items = listed["result"].as_array().expect("list");
    assert_eq!(items.len(), 2, "admin + new");
    items.iter().for_each(|k| assert_key_fields(k, false));
    assert_eq!(
        s.responses_containing(&value),
        1,
        "the value appears only on creation"
    );

    // The new read/write key works, and can manage keys itself.
    assert_eq!(s.json("POST", ROUTES[0].0, &value, QUICKHIT).status, 200);
    let (_, by_new, created) = create_key(&s, "/v2/keys", &value, json!({"name": "made by CI"}));
    assert_eq!(created["created_by"], id.as_str());

    // PATCH: name, then read-only.
    let path = format!("/v2/keys/{id}");
    let r = s.json("PATCH", &path, &s.admin, r#"{"name":"CI (renamed)"}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(managed(&r)["result"]["name"], "CI (renamed)");
    let r = s.json("PATCH", &path, &s.admin, r#"{"permissions":["fetch"]}"#);
    assert_eq!(managed(&r)["result"]["permissions"], json!(["fetch"]));
    // A fetch-only key may GET but not POST, PATCH or DELETE, nor generate.
    assert_eq!(s.get("GET", "/v2/keys", &value).status, 200);
    assert_eq!(s.get("GET", &path, &value).status, 200);
    assert_eq!(s.get("GET", "/v2/tokens", &value).status, 200);
    assert_eq!(s.get("GET", "/v2/connectors", &value).status, 200);
    managed_refused(
        &s.json("POST", "/v2/keys", &value, r#"{"name":"x"}"#),
        403,
        "forbidden",
    );
    managed_refused(
        &s.json("PATCH", &path, &value, r#"{"name":"x"}"#),
        403,
        "forbidden",
    );
    managed_refused(&s.get("DELETE", &path, &value), 403, "forbidden");
    managed_refused(
        &s.json("POST", "/v2/tokens", &value, r#"{"type":"svc","name":"x"}"#),
        403,
        "forbidden",
    );
    refused(
        &s.json("POST", ROUTES[0].0, &value, QUICKHIT),
        403,
        "forbidden",
    );
    // ...and back to read/write.
    let r = s.json(
        "PATCH",
        &path,
        &s.admin,
        r#"{"permissions":[],"ips":["127.0.0.0/8"]}"#,
    );
    assert_eq!(managed(&r)["result"]["permissions"], json!([]));
    assert_eq!(managed(&r)["result"]["ips"], json!(["127.0.0.0/8"]));
    assert_eq!(s.json("POST", ROUTES[0].0, &value, QUICKHIT).status, 200);

    // Validation.
    let long = "x".repeat(51);
    for (method, p, body, mentions) in [
        ("POST", "/v2/keys", json!({"name": ""}), "name"),
        ("POST", "/v2/keys", json!({"name": long}), "name"),
        (
            "POST",
            "/v2/keys",
            json!({"type": "service", "name": "x"}),
            "api",
        ),
        (
            "POST",
            "/v2/keys",
            json!({"name": "x", "permissions": ["*"]}),
            "fetch",
        ),
        (
            "POST",
            "/v2/keys",
            json!({"name": "x", "ips": ["not an ip"]}),
            "ip",
        ),
        (
            "POST",
            "/v2/keys",
            json!({"name": "x", "credits": 5}),
            "credits",
        ),
        ("PATCH", path.as_str(), json!({}), "at least one"),
        ("PATCH", path.as_str(), json!({"type": "other"}), "type"),
        ("POST", "/v2/tokens", json!({"name": "no type"}), "type"),
    ] {
        let r = s.json(method, p, &s.admin, &body.to_string());
        let v = managed_refused(&r, 400, "invalid_request");
        let message = v["errors"][0]["message"].as_str().unwrap_or_default();
        assert!(message.contains(mentions), "{body}: {message}");
    }
    let r = s.send(
        "POST",
        "/v2/keys",
        &[("authorization", &format!("Bearer {}", s.admin))],
        Some("{}"),
    );
    managed_refused(&r, 415, "unsupported_media_type");
    managed_refused(
        &s.get("GET", "/v2/keys/key_forged", &s.admin),
        404,
        "not_found",
    );

    // DELETE revokes: the very next request with the key is refused.
    let r = s.get("DELETE", &path, &s.admin);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(managed(&r)["result"], json!({"id": id, "deleted": true}));
    refused(
        &s.json("POST", ROUTES[0].0, &value, QUICKHIT),
        401,
        "not_found",
    );
    managed_refused(&s.get("GET", "/v2/keys", &value), 401, "not_found");
    managed_refused(&s.get("GET", &path, &s.admin), 404, "not_found");
    managed_refused(&s.get("DELETE", &path, &s.admin), 404, "not_found");
    // The key it created lives on.
    assert_eq!(s.json("POST", ROUTES[0].0, &by_new, QUICKHIT).status, 200);
    assert_eq!(s.responses_containing(&value), 1);
    s.assert_no_secrets(&[]);
}

/// Creates a key through the library and returns (public id, plaintext).
fn library_key(s: &Server, new: NewKey) -> (String, String) {
    let created = s.ledger.keys().create(new).expect("create key");
    (
        created.info.id.to_string(),
        created.plaintext.expose().to_owned(),
    )
}

#[test]
fn a_managing_key_never_makes_a_key_broader_than_itself() {
    // Found by a reviewer: a `manage` key minted `*` keys without its allowlist, expiry or
    // limits, and could widen itself or change the admin key.
    let s = Server::start();
    let until = s.clock.now().plus_secs(3_600);
    let (parent_id, parent) = library_key(
        &s,
        NewKey::new(s.account.as_str(), "ops bot")
            .permissions(["fetch", "manage"])
            .ips(["127.0.0.0/8"])
            .expires_at(until)
            .rate_limit("requests", 50, 3_600)
            .pool(s.pool.as_str()),
    );
    // Not `*` (what `permissions: []` asks for), not outside its own range.
    for body in [
        json!({"name": "child"}),
        json!({"name": "child", "permissions": ["fetch"], "ips": ["10.0.0.1"]}),
    ] {
        let r = s.json("POST", "/v2/keys", &parent, &body.to_string());
        managed_refused(&r, 403, "forbidden");
    }
    // A read-only child gets the parent's allowlist, expiry, limits and pool.
    let body = json!({"name": "child", "permissions": ["fetch"]});
    let (child_id, _, _) = create_key(&s, "/v2/keys", &parent, body);
    let child = s.ledger.keys().get(&child_id).unwrap();
    assert_eq!(child.permissions, ["fetch"]);
    assert_eq!(child.ips, ["127.0.0.0/8"]);
    assert_eq!(child.expires_at, Some(until));
    assert_eq!(child.limits.rate_limits.len(), 1);
    assert_eq!(
        child.pool.as_ref().map(|p| p.as_str()),
        Some(s.pool.as_str())
    );
    let body = json!({"name": "narrow", "permissions": ["fetch"], "ips": ["127.0.0.1"]});
    let (narrow_id, _, _) = create_key(&s, "/v2/keys", &parent, body);
    assert_eq!(
        s.ledger.keys().get(&narrow_id).unwrap().ips,
        ["127.0.0.1/32"]
    );

    // Not widen itself, nor lift its allowlist.
    for body in [json!({"permissions": []}), json!({"ips": ["0.0.0.0/0"]})] {
        let r = s.json(
            "PATCH",
            &format!("/v2/keys/{parent_id}"),
            &parent,
            &body.to_string(),
        );
        managed_refused(&r, 403, "forbidden");
    }
    let me = s.ledger.keys().get(&parent_id).unwrap();
    assert_eq!(
        (me.permissions, me.ips),
        (
            vec!["fetch".into(), "manage".into()],
            vec!["127.0.0.0/8".into()]
        )
    );
    // Clearing a child's allowlist hands the parent's on again; renaming it is fine.
    let r = s.json(
        "PATCH",
        &format!("/v2/keys/{narrow_id}"),
        &parent,
        r#"{"ips":[]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        s.ledger.keys().get(&narrow_id).unwrap().ips,
        ["127.0.0.0/8"]
    );
    // Not touch the admin key (`*`, no allowlist).
    let admin = format!("/v2/keys/{}", s.admin_id);
    managed_refused(
        &s.json("PATCH", &admin, &parent, r#"{"name":"mine"}"#),
        403,
        "forbidden",
    );
    managed_refused(&s.get("DELETE", &admin, &parent), 403, "forbidden");
    assert_eq!(
        s.ledger.keys().get(s.admin_id.as_str()).unwrap().name,
        "admin"
    );
    // The admin key still manages everything.
    let r = s.get("DELETE", &format!("/v2/keys/{child_id}"), &s.admin);
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn an_ipv4_mapped_range_is_checked_as_the_ipv4_range_it_is_stored_as() {
    // Found by a reviewer: `::ffff:0.0.0.0/96` lies inside `::/0` as IPv6, and the library
    // stores it as `0.0.0.0/0`, so a key limited to 127.0.0.0/8 minted a key usable anywhere.
    let s = Server::start();
    let (_, parent) = library_key(
        &s,
        NewKey::new(s.account.as_str(), "ops bot")
            .permissions(["fetch", "manage"])
            .ips(["127.0.0.0/8", "::/0"]),
    );
    let body = json!({"name": "child", "permissions": ["fetch"], "ips": ["::ffff:0.0.0.0/96"]});
    let r = s.json("POST", "/v2/keys", &parent, &body.to_string());
    managed_refused(&r, 403, "forbidden");
    // Ranges are read as the library reads them: mapped, trimmed, host bits cleared.
    let ips = [
        "::ffff:127.0.0.1",
        " 127.0.0.2 ",
        "127.1.2.3/16",
        "2001:db8::1",
    ];
    let body = json!({"name": "child", "permissions": ["fetch"], "ips": ips});
    let (child, _, _) = create_key(&s, "/v2/keys", &parent, body);
    assert_eq!(
        s.ledger.keys().get(&child).unwrap().ips,
        [
            "127.0.0.1/32",
            "127.0.0.2/32",
            "127.1.0.0/16",
            "2001:db8::1/128"
        ]
    );
}

#[test]
fn a_key_with_an_expiry_limits_or_a_budget_cannot_change_keys_without_them() {
    // Found by a reviewer: a `*` key that expires or is rate limited could delete the admin
    // key, which is neither; one on a pool could delete keys that spend from elsewhere.
    let s = Server::start();
    let until = s.clock.now().plus_secs(3_600);
    let acct = s.account.as_str();
    let (unmetered, _) = library_key(&s, NewKey::new(acct, "unmetered").permissions(["*"]));
    let (funded_id, funded) = library_key(
        &s,
        NewKey::new(acct, "funded").permissions(["*"]).credits(5),
    );
    let expiring = NewKey::new(acct, "expiring")
        .permissions(["*"])
        .expires_at(until);
    let limited = NewKey::new(acct, "limited")
        .permissions(["*"])
        .rate_limit("requests", 50, 60);
    let windowed = NewKey::new(acct, "windowed")
        .permissions(["*"])
        .token_window(1_000, 60);
    let pooled = NewKey::new(acct, "pooled")
        .permissions(["*"])
        .pool(s.pool.as_str());
    let broader_targets = [
        (expiring, vec![s.admin_id.to_string()]),
        (limited, vec![s.admin_id.to_string()]),
        (windowed, vec![s.admin_id.to_string()]),
        (pooled, vec![unmetered.clone(), funded_id]),
    ];
    for (caller, targets) in broader_targets {
        let (caller_id, caller) = library_key(&s, caller);
        for target in targets {
            let path = format!("/v2/keys/{target}");
            let r = s.json("PATCH", &path, &caller, r#"{"name":"mine"}"#);
            managed_refused(&r, 403, "forbidden");
            managed_refused(&s.get("DELETE", &path, &caller), 403, "forbidden");
        }
        // What it mints is within its bounds, so it may change and delete that.
        let (child, _, _) = create_key(&s, "/v2/keys", &caller, json!({"name": "child"}));
        let path = format!("/v2/keys/{child}");
        let r = s.json("PATCH", &path, &caller, r#"{"name":"renamed"}"#);
        assert_eq!(r.status, 200, "{caller_id}: {}", r.body);
        assert_eq!(s.get("DELETE", &path, &caller).status, 200);
    }
    // A looser limit of the same name is broader too.
    let (_, strict) = library_key(
        &s,
        NewKey::new(acct, "strict")
            .permissions(["*"])
            .rate_limit("requests", 10, 60),
    );
    let (loose, _) = library_key(
        &s,
        NewKey::new(acct, "loose")
            .permissions(["*"])
            .rate_limit("requests", 20, 60),
    );
    let r = s.get("DELETE", &format!("/v2/keys/{loose}"), &strict);
    managed_refused(&r, 403, "forbidden");
    // A key with a balance of its own changes itself only.
    let r = s.get("DELETE", &format!("/v2/keys/{unmetered}"), &funded);
    managed_refused(&r, 403, "forbidden");
    // A token is bounded the same way, over keys and tokens alike.
    let token = NewKey::token(acct, "service", "expiring token")
        .permissions(["*"])
        .expires_at(until);
    let token = s.ledger.tokens().create(token).unwrap().plaintext;
    let token = token.expose();
    let r = s.get("DELETE", &format!("/v2/keys/{}", s.admin_id), token);
    managed_refused(&r, 403, "forbidden");
    let forever = NewKey::token(acct, "service", "forever").permissions(["fetch"]);
    let forever = s.ledger.tokens().create(forever).unwrap().info.id;
    let r = s.get("DELETE", &format!("/v2/tokens/{forever}"), token);
    managed_refused(&r, 403, "forbidden");
    assert_eq!(
        s.ledger.keys().get(s.admin_id.as_str()).unwrap().name,
        "admin"
    );
}

#[test]
fn a_management_body_must_arrive_in_time_and_its_caller_acts_as_it_now_is() {
    // Found by reviewers: with a deadline on the whole request, a management write still
    // committed after its request was answered 408 (a blocking write is not cancelled); with
    // none, a client could trickle its body for ever and act long after its key was
    // verified. Now only the body's arrival is bounded, before anything is written, and the
    // caller is read again once it is in.
    use std::io::{Read, Write};
    let s = Server::start();
    let acct = s.account.as_str();
    let star = |name: &str| library_key(&s, NewKey::new(acct, name).permissions(["*"]));
    let (_, stalled) = star("stalled");
    let (disabled_id, disabled) = star("disabled");
    let (demoted_id, demoted) = star("demoted");
    let (deleted_id, deleted) = star("deleted");
    let (_, steady) = star("steady");
    let (target, _) = library_key(&s, NewKey::new(acct, "target").permissions(["fetch"]));
    let rest = r#""renamed"}"#;
    let start = |key: &str| {
        let mut conn = std::net::TcpStream::connect(s.addr).unwrap();
        let head = format!(
            "PATCH /v2/keys/{target} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n\
             content-type: application/json\r\nconnection: close\r\n\
             content-length: {}\r\n\r\n{{\"name\":",
            8 + rest.len()
        );
        conn.write_all(head.as_bytes()).unwrap();
        let deadline = server_support::REQUEST_DEADLINE;
        conn.set_read_timeout(Some(deadline * 3)).unwrap();
        conn
    };
    let answer = |conn: &mut std::net::TcpStream, finish: bool| {
        if finish {
            conn.write_all(rest.as_bytes()).unwrap();
        }
        let mut answer = String::new();
        conn.read_to_string(&mut answer).unwrap();
        let code = answer
            .split("\"code\":\"")
            .nth(1)
            .and_then(|c| c.split('"').next());
        (answer[9..12].to_owned(), code.unwrap_or("").to_owned())
    };
    let mut slow = start(&stalled);
    let mut waiting: Vec<_> = [&disabled, &demoted, &deleted]
        .into_iter()
        .map(|k| start(k))
        .collect();
    // Changed while their bodies are on the way.
    let keys = s.ledger.keys();
    keys.disable(&disabled_id).unwrap();
    let read_only = keyledger::KeyUpdate::new().permissions(["fetch"]);
    keys.update(&demoted_id, read_only).unwrap();
    keys.delete(&deleted_id).unwrap();
    let expected = [
        ("401", "disabled"),
        ("403", "forbidden"),
        ("401", "not_found"),
    ];
    for (conn, (status, code)) in waiting.iter_mut().zip(expected) {
        assert_eq!(answer(conn, true), (status.to_owned(), code.to_owned()));
    }
    assert_eq!(keys.get(&target).unwrap().name, "target");
    // A body that never comes is refused once the deadline passes, and changes nothing.
    let timed_out = ("408".to_owned(), "request_timeout".to_owned());
    assert_eq!(answer(&mut slow, false), timed_out);
    assert_eq!(keys.get(&target).unwrap().name, "target");
    // One that comes in time is served.
    assert_eq!(
        answer(&mut start(&steady), true),
        ("200".to_owned(), String::new())
    );
    assert_eq!(keys.get(&target).unwrap().name, "renamed");
}

#[test]
fn a_test_key_mints_and_changes_test_keys_only() {
    // Found by a reviewer: a `vb_test_` key minted live keys and renamed the admin key.
    let s = Server::start();
    let acct = s.account.as_str();
    let test = NewKey::new(acct, "sandbox")
        .permissions(["*"])
        .test()
        .pool(s.pool.as_str());
    let (_, test) = library_key(&s, test);
    let (child, value, _) = create_key(&s, "/v2/keys", &test, json!({"name": "child"}));
    assert!(
        value.starts_with("vb_test_"),
        "a test key's child is a test key"
    );
    let r = s.json(
        "PATCH",
        &format!("/v2/keys/{child}"),
        &test,
        r#"{"name":"c"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let admin = format!("/v2/keys/{}", s.admin_id);
    managed_refused(
        &s.json("PATCH", &admin, &test, r#"{"name":"x"}"#),
        403,
        "forbidden",
    );
    let body = r#"{"type":"service","name":"t"}"#;
    managed_refused(&s.json("POST", "/v2/tokens", &test, body), 403, "forbidden");
    assert_eq!(
        s.ledger.keys().get(s.admin_id.as_str()).unwrap().name,
        "admin"
    );
}

#[test]
fn management_answers_are_private_and_its_queries_and_bodies_strict() {
    // Found by a reviewer: listings had no `Cache-Control` (a proxy may keep an `x-api-key`
    // request's answer for anyone), a repeated `limit` read its last value, a read-only key
    // was sent `100 Continue` and its body read before its 403, and a 413 said
    // `invalid_request`.
    use std::io::{Read, Write};
    let s = Server::start();
    let listing = s.send("GET", "/v2/keys", &[("x-api-key", s.admin.as_str())], None);
    assert_eq!(listing.status, 200, "{}", listing.body);
    assert_eq!(listing.header("cache-control"), Some("no-store"));
    assert_eq!(listing.header("vary"), Some("authorization, x-api-key"));
    for query in ["limit=1&limit=3", "limit=%2B5", "limit="] {
        let r = s.get("GET", &format!("/v2/keys?{query}"), &s.admin);
        managed_refused(&r, 400, "invalid_request");
    }
    let big = format!(r#"{{"name":"{}"}}"#, "x".repeat(3 << 20));
    managed_refused(
        &s.json("POST", "/v2/keys", &s.admin, &big),
        413,
        "payload_too_large",
    );
    let acct = s.account.as_str();
    let (_, reader) = library_key(&s, NewKey::new(acct, "reader").permissions(["fetch"]));
    let mut conn = std::net::TcpStream::connect(s.addr).unwrap();
    let head = format!(
        "POST /v2/keys HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {reader}\r\n\
         content-type: application/json\r\nexpect: 100-continue\r\n\
         content-length: 100\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).unwrap();
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut answer = [0u8; 12];
    conn.read_exact(&mut answer).unwrap();
    assert_eq!(
        &answer, b"HTTP/1.1 403",
        "refused before its body is asked for"
    );
}

/// A key sent where a name, a value or a query parameter goes is refused without being sent
/// back: the 400 names what is wrong and hides any refused text of 16 characters or more, as
/// the library's own messages do. (Found by a reviewer: serde's messages and the server's own
/// checks echoed it, and proxies log response bodies.)
#[test]
fn a_key_sent_as_a_name_or_value_is_never_echoed() {
    let s = Server::start();
    let (_, pasted) = library_key(&s, NewKey::new(s.account.as_str(), "pasted"));
    let q = "/api/v1/quickhits/create";
    let bodies = [
        (
            "/v2/keys",
            format!(r#"{{"name":"c","permissions":"{pasted}"}}"#),
        ),
        ("/v2/keys", format!(r#"{{"name":"c","{pasted}":1}}"#)),
        (
            "/v2/keys",
            format!(r#"{{"name":"c","permissions":["fetch"],"ips":["{pasted}"]}}"#),
        ),
        (q, format!(r#"{{"prompt":"x","mode":"{pasted}"}}"#)),
        (
            q,
            format!(r#"{{"prompt":"x","context":[{{"type":"{pasted}"}}]}}"#),
        ),
        // A quote inside the text ended the hiding of a quoted part (a second reviewer).
        ("/v2/keys", format!(r#"{{"name":"c","`{pasted}":1}}"#)),
        (
            "/v2/keys",
            format!(r#"{{"name":"c","permissions":"a\"{pasted}"}}"#),
        ),
    ];
    for (path, body) in &bodies {
        let r = s.json("POST", path, &s.admin, body);
        assert_eq!(r.status, 400, "{path} {}", r.body);
    }
    // A managing key with an allowlist checks the ranges it is asked for itself, first.
    let fenced = NewKey::new(s.account.as_str(), "ops bot").permissions(["fetch", "manage"]);
    let (_, fenced) = library_key(&s, fenced.ips(["127.0.0.0/8"]));
    let body = format!(r#"{{"name":"c","permissions":["fetch"],"ips":["{pasted}"]}}"#);
    let r = s.json("POST", "/v2/keys", &fenced, &body);
    managed_refused(&r, 400, "invalid_request");
    let twice = format!("/v2/keys?{pasted}=1&{pasted}=2");
    managed_refused(&s.get("GET", &twice, &s.admin), 400, "invalid_request");
    s.assert_no_secrets(&[&pasted]);
    // A short refused value is still shown, so a typo can be seen.
    let r = s.json("POST", q, &s.admin, r#"{"prompt":"x","mode":"wide"}"#);
    assert!(r.body.contains("wide"), "{}", r.body);
}

#[test]
fn a_client_trickling_its_headers_is_cut_off() {
    // Found by a reviewer: with `axum::serve` there was no header deadline, so a client
    // sending one header line a second, no key yet, held its connection for ever.
    use std::io::{ErrorKind, Read, Write};
    let s = Server::start();
    let mut conn = std::net::TcpStream::connect(s.addr).unwrap();
    conn.write_all(b"GET /v2/keys HTTP/1.1\r\nhost: x\r\n")
        .unwrap();
    let started = std::time::Instant::now();
    // The test server's header deadline is 1 s; 30 lines over 3 s go well past it.
    let mut refused = false;
    for _ in 0..30 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if conn.write_all(b"x-a: b\r\n").is_err() {
            refused = true;
            break;
        }
    }
    if !refused {
        conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut rest = Vec::new();
        let closed = match conn.read_to_end(&mut rest) {
            Ok(_) => true,
            Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        };
        assert!(closed, "the server still held the connection");
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(9));
}

#[test]
fn minting_a_key_never_mints_credits() {
    // Found by a reviewer: a key with 3 credits of its own, in an account without a pool,
    // minted an unmetered key.
    let s = Server::start();
    let acme = s.ledger.accounts().create(NewAccount::new("Acme")).unwrap();
    let (_, funded) = library_key(
        &s,
        NewKey::new(acme.id.as_str(), "a")
            .permissions(["*"])
            .credits(3),
    );
    let r = s.json("POST", "/v2/keys", &funded, r#"{"name":"child"}"#);
    managed_refused(&r, 403, "forbidden");
    // An unmetered key in an account without a pool mints unmetered keys: nothing widens.
    let (_, free) = library_key(&s, NewKey::new(acme.id.as_str(), "b").permissions(["*"]));
    let (child, _, _) = create_key(&s, "/v2/keys", &free, json!({"name": "child"}));
    assert_eq!(s.ledger.keys().get(&child).unwrap().remaining_credits, None);
}

#[test]
fn a_request_whose_body_stalls_is_answered_408_and_refunded() {
    // Found by a reviewer: the grant was held for as long as the client kept its body
    // coming, with the key's credits (and a graceful shutdown) waiting on it.
    use std::io::{Read, Write};
    let s = Server::start();
    let (id, k) = library_key(
        &s,
        NewKey::new(s.account.as_str(), "one credit")
            .permissions(["*"])
            .credits(1),
    );
    let mut stalled = std::net::TcpStream::connect(s.addr).unwrap();
    let head = format!(
        "POST /api/v1/quickhits/create HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {k}\r\n\
         content-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"prompt\":"
    );
    stalled.write_all(head.as_bytes()).unwrap();
    let deadline = server_support::REQUEST_DEADLINE;
    stalled.set_read_timeout(Some(deadline * 3)).unwrap();
    let mut answer = [0u8; 12];
    stalled.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 408");
    // The credit is back: the next request gets it.
    let r = s.json("POST", "/api/v1/quickhits/create", &k, QUICKHIT);
    assert_eq!(r.status, 200, "{}", r.body);
    let usage = s.ledger.credits().usage(&id).unwrap();
    assert_eq!((usage.spent, usage.remaining), (1, Some(0)));
}

#[test]
fn tokens_have_the_same_lifecycle_with_a_type() {
    let s = Server::start();
    let (id, value, result) = create_key(
        &s,
        "/v2/tokens",
        &s.admin,
        json!({"type": "service", "name": "billing worker", "permissions": ["fetch"]}),
    );
    assert_key_fields(&result, true);
    assert_opaque(&id, "tok_");
    assert!(value.starts_with("vb_tok_"), "tokens have their own prefix");
    assert_eq!(result["type"], "service");
    assert_eq!(result["permissions"], json!(["fetch"]));
    let path = format!("/v2/tokens/{id}");
    assert_eq!(
        managed(&s.get("GET", &path, &s.admin))["result"]["type"],
        "service"
    );
    let tokens = managed(&s.get("GET", "/v2/tokens", &s.admin));
    assert_eq!(tokens["result"].as_array().map(Vec::len), Some(1));
    // Keys and tokens are separate collections.
    let keys = managed(&s.get("GET", "/v2/keys", &s.admin));
    assert!(
        keys["result"]
            .as_array()
            .expect("list")
            .iter()
            .all(|k| k["id"] != id.as_str())
    );
    managed_refused(
        &s.get("GET", &format!("/v2/keys/{id}"), &s.admin),
        404,
        "not_found",
    );
    // The token authenticates, read-only.
    assert_eq!(s.get("GET", "/v2/tokens", &value).status, 200);
    managed_refused(&s.get("DELETE", &path, &value), 403, "forbidden");
    let r = s.json("PATCH", &path, &s.admin, r#"{"name":"billing"}"#);
    assert_eq!(managed(&r)["result"]["name"], "billing");
    assert_eq!(s.get("DELETE", &path, &s.admin).status, 200);
    managed_refused(&s.get("GET", "/v2/tokens", &value), 401, "not_found");
    assert_eq!(s.responses_containing(&value), 1);
    s.assert_no_secrets(&[]);
}

#[test]
fn listings_paginate_through_links_next() {
    let s = Server::start();
    let mut created = vec![s.admin_id.to_string()];
    for i in 0..6 {
        let (id, _, _) = create_key(&s, "/v2/keys", &s.admin, json!({"name": format!("k{i}")}));
        created.push(id);
    }
    let mut seen = Vec::new();
    let mut next = Some("/v2/keys?limit=3".to_owned());
    let mut pages = 0;
    while let Some(path) = next {
        let r = s.get("GET", &path, &s.admin);
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        let v = managed(&r);
        assert_eq!(v["links"]["self"], path.as_str());
        let items = v["result"].as_array().expect("page");
        assert!(items.len() <= 3);
        seen.extend(
            items
                .iter()
                .map(|k| k["id"].as_str().expect("id").to_owned()),
        );
        next = v["links"]["next"].as_str().map(str::to_owned);
        pages += 1;
    }
    assert_eq!(pages, 3, "7 keys in pages of 3");
    assert_eq!(seen, created, "every key once, in creation order");
    // Default page size 25 holds them all, without `next`.
    let v = managed(&s.get("GET", "/v2/keys", &s.admin));
    assert_eq!(v["result"].as_array().map(Vec::len), Some(7));
    assert!(v["links"].get("next").is_none());
    for bad in ["limit=0", "limit=101", "limit=ten", "cursor=not-a-cursor"] {
        let r = s.get("GET", &format!("/v2/keys?{bad}"), &s.admin);
        managed_refused(&r, 400, "invalid_request");
    }
    s.assert_no_secrets(&[]);
}

#[test]
fn management_never_touches_another_owners_keys() {
    let s = Server::start();
    let acme = s
        .ledger
        .accounts()
        .create(NewAccount::new("Acme"))
        .expect("account");
    let acme_key = key(
        &s,
        NewKey::new(acme.id.as_str(), "acme admin").permissions(["*"]),
    );
    let mine = managed(&s.get("GET", "/v2/keys", &acme_key));
    let ids: Vec<&str> = mine["result"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|k| k["id"].as_str())
        .collect();
    assert_eq!(ids.len(), 1);
    assert_ne!(ids[0], s.admin_id.as_str());
    let theirs = format!("/v2/keys/{}", s.admin_id);
    let foreign = managed_refused(&s.get("GET", &theirs, &acme_key), 404, "not_found");
    // A forged id reads exactly like a foreign one. (Found by a reviewer: "no such id".)
    let mut forged = s.admin_id.to_string();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    let forged = managed_refused(
        &s.get("GET", &format!("/v2/keys/{forged}"), &acme_key),
        404,
        "not_found",
    );
    assert_eq!(forged["errors"], foreign["errors"]);
    managed_refused(
        &s.json("PATCH", &theirs, &acme_key, r#"{"name":"pwned"}"#),
        404,
        "not_found",
    );
    managed_refused(&s.get("DELETE", &theirs, &acme_key), 404, "not_found");
    // Untouched.
    let admin = managed(&s.get("GET", &theirs, &s.admin));
    assert_eq!(admin["result"]["name"], "admin");
    assert_eq!(s.json("POST", ROUTES[0].0, &s.admin, QUICKHIT).status, 200);
    // Keys created by Acme belong to Acme.
    let (id, _, _) = create_key(&s, "/v2/keys", &acme_key, json!({"name": "acme ci"}));
    managed_refused(
        &s.get("GET", &format!("/v2/keys/{id}"), &s.admin),
        404,
        "not_found",
    );
    s.assert_no_secrets(&[&acme_key]);
}

#[test]
fn connectors_list_metadata_only() {
    let s = Server::start();
    let access = "ya29.ACCESS-token-that-must-stay-inside";
    let refresh = "1//REFRESH-token-that-must-stay-inside";
    let grant = OAuthGrant::new(Secret::new(access))
        .refresh_token(Secret::new(refresh))
        .scopes(["drive.readonly"])
        .expires_in_secs(3_600);
    s.ledger
        .vault()
        .connect(&s.account, &Provider::GoogleDrive, grant)
        .expect("connect");
    let r = s.get("GET", "/v2/connectors", &s.admin);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = managed(&r);
    let list = v["result"].as_array().expect("list");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["provider"], "google_drive");
    assert_eq!(list[0]["scopes"], json!(["drive.readonly"]));
    assert_eq!(list[0]["health"], "healthy");
    assert_eq!(list[0]["has_refresh_token"], true);
    // Another account sees none of it.
    let acme = s
        .ledger
        .accounts()
        .create(NewAccount::new("Acme"))
        .expect("account");
    let acme_key = key(&s, NewKey::new(acme.id.as_str(), "acme").permissions(["*"]));
    assert_eq!(
        managed(&s.get("GET", "/v2/connectors", &acme_key))["result"],
        json!([])
    );
    s.assert_no_secrets(&[access, refresh, &acme_key]);
}

#[test]
fn auth_off_serves_without_keys_for_the_load_baseline() {
    let s = Server::start_with(AuthMode::Off);
    let r = s.send(
        "POST",
        ROUTES[0].0,
        &[("content-type", "application/json")],
        Some(QUICKHIT),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = envelope(&r);
    assert!(v["token_stats"].is_null() && v["pricing"].is_null());
    s.assert_no_secrets(&[]);
}

/// A key made through the library shows what it holds: `[]` only for `*` (read/write),
/// `null` for a key that holds no permission, its scopes otherwise. (Both showed `[]`, so
/// a key that may do nothing read as read/write. Found by a reviewer.)
#[test]
fn a_listing_tells_a_key_with_no_permission_from_a_read_write_one() {
    let s = Server::start();
    let owner = s.account.as_str();
    let none: [&str; 0] = [];
    for (name, new, shown) in [
        (
            "all",
            NewKey::new(owner, "all").permissions(["*"]),
            json!([]),
        ),
        (
            "none",
            NewKey::new(owner, "none").permissions(none),
            Value::Null,
        ),
        (
            "quiz",
            NewKey::new(owner, "quiz").permissions(["quizzes:*"]),
            json!(["quizzes:*"]),
        ),
    ] {
        let (id, _) = library_key(&s, new);
        let got = managed(&s.get("GET", &format!("/v2/keys/{id}"), &s.admin));
        assert_eq!(got["result"]["permissions"], shown, "{name}: {got}");
    }
}

/// An id that is not UTF-8 once decoded names no key: answered in the envelope as an
/// unknown id is, not in axum's plain text. (Found by a reviewer.)
#[test]
fn an_id_that_is_not_utf8_is_not_found_in_the_envelope() {
    let s = Server::start();
    for base in ["/v2/keys", "/v2/tokens"] {
        let path = format!("{base}/%FF%FE");
        for method in ["GET", "DELETE"] {
            managed_refused(&s.get(method, &path, &s.admin), 404, "not_found");
        }
        let patch = s.json("PATCH", &path, &s.admin, r#"{"name":"x"}"#);
        managed_refused(&patch, 404, "not_found");
    }
}

#[test]
fn a_server_at_its_connection_cap_serves_the_next_client_once_one_leaves() {
    use std::io::{ErrorKind, Read, Write};
    use std::time::Duration;
    let s = Server::start_capped(2);
    let auth = format!("Bearer {}", s.admin);
    let mut held: Vec<_> = (0..2)
        .map(|_| {
            let mut conn = server_support::http::Connection::open(s.addr).unwrap();
            let r = conn.send("GET", "/v2/keys", &[("authorization", &auth)], None);
            assert_eq!(r.unwrap().status, 200);
            conn // kept open: the server holds its connection until it closes
        })
        .collect();
    let mut third = std::net::TcpStream::connect(s.addr).unwrap();
    let request = format!("GET /v2/keys HTTP/1.1\r\nhost: x\r\nauthorization: {auth}\r\n\r\n");
    third.write_all(request.as_bytes()).unwrap();
    // Past the cap the connection waits in the listen backlog: nothing is read from it.
    third
        .set_read_timeout(Some(Duration::from_millis(400)))
        .unwrap();
    let mut first = [0; 12];
    let waited = third.read(&mut first).unwrap_err();
    assert!(
        matches!(waited.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{waited}"
    );
    // One held connection leaves: the waiting one is accepted and answered.
    held.pop();
    third
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    third.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
}

#[test]
fn a_connection_left_idle_is_closed_at_the_header_deadline() {
    use std::io::Read;
    let s = Server::start();
    let bearer = format!("Bearer {}", s.admin);
    let auth = [("authorization", bearer.as_str())];
    let mut kept_alive = server_support::http::Connection::open(s.addr).unwrap();
    let listed = kept_alive.send("GET", "/v2/keys", &auth, None).unwrap();
    assert_eq!(listed.status, 200);
    let mut silent = std::net::TcpStream::connect(s.addr).unwrap();
    silent
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    // The test server's header deadline is 1 s: a client that never sends a request
    // is let go, and so is one that sends nothing after its first response.
    assert_eq!(silent.read(&mut [0; 1]).unwrap(), 0);
    assert!(kept_alive.send("GET", "/v2/keys", &auth, None).is_err());
}

/// A 401 carries `WWW-Authenticate` (RFC 9110 §15.5.2), also when the management surface
/// refuses a caller disabled or deleted while its body was on the way, not only when the
/// auth layer refuses it (found by a reviewer). `Expect: 100-continue` makes the order
/// certain: the server asks for the body only once the key was verified.
#[test]
fn a_401_for_a_caller_changed_mid_request_carries_www_authenticate() {
    use std::io::{BufRead, BufReader, Read, Write};
    let s = Server::start();
    let acct = s.account.as_str();
    let body = r#"{"name":"child"}"#;
    for change in ["disable", "delete"] {
        let (id, key) = library_key(&s, NewKey::new(acct, change).permissions(["*"]));
        let conn = std::net::TcpStream::connect(s.addr).unwrap();
        conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut reader = BufReader::new(conn);
        let head = format!(
            "POST /v2/keys HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n\
             content-type: application/json\r\nconnection: close\r\nexpect: 100-continue\r\n\
             content-length: {}\r\n\r\n",
            body.len()
        );
        reader.get_mut().write_all(head.as_bytes()).unwrap();
        // Verified: the server now asks for the body.
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("HTTP/1.1 100"), "{line}");
        reader.read_line(&mut line).unwrap(); // the blank line after it
        match change {
            "disable" => drop(s.ledger.keys().disable(&id).unwrap()),
            _ => s.ledger.keys().delete(&id).unwrap(),
        }
        reader.get_mut().write_all(body.as_bytes()).unwrap();
        let mut answer = String::new();
        reader.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 401"), "{change}: {answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("\r\nwww-authenticate: bearer"),
            "{change}: a 401 without WWW-Authenticate: {answer}"
        );
    }
}

#[test]
fn keyless_clients_that_never_read_are_let_go_at_the_write_deadline() {
    // Found by a reviewer: clients with no key that pipelined requests for an unknown path
    // and never read the answers held every connection the server allows, for good (hyper
    // has no write deadline), and a keyed client waited in the backlog behind them.
    use std::io::{ErrorKind, Read, Write};
    use std::time::Duration;
    // At most two connections; a 1 s header and write deadline (main.rs: 512, 10 s).
    let s = Server::start_capped_with(2, Duration::from_secs(1));
    let hogs: Vec<_> = (0..2)
        .map(|_| {
            let conn = std::net::TcpStream::connect(s.addr).unwrap();
            let mut writer = conn.try_clone().unwrap();
            std::thread::spawn(move || {
                let many = b"GET /nope HTTP/1.1\r\nhost: x\r\n\r\n".repeat(1000);
                for _ in 0..20 {
                    if writer.write_all(&many).is_err() {
                        break;
                    }
                }
            });
            conn // never read
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3)); // three write deadlines
    let mut keyed = std::net::TcpStream::connect(s.addr).unwrap();
    let auth = format!("Bearer {}", s.admin);
    let request = format!("GET /v2/keys HTTP/1.1\r\nhost: x\r\nauthorization: {auth}\r\n\r\n");
    keyed.write_all(request.as_bytes()).unwrap();
    keyed
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut status = [0u8; 12];
    let got = keyed.read_exact(&mut status);
    drop(hogs);
    if let Err(e) = &got {
        assert!(
            !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "a keyed client waited 10 s behind two keyless clients that stopped reading"
        );
    }
    got.unwrap();
    assert_eq!(&status, b"HTTP/1.1 200");
}

#[test]
fn a_slow_handler_is_answered_504_not_408_and_is_not_charged() {
    // Found by a reviewer: one deadline covered the body and the handler, so a slow handler
    // was answered 408 "a body sent too slowly?", which invites a resend of the POST.
    let g = server_support::Guarded::start(std::time::Duration::from_secs(1));
    let r = g.post("/api/v1/quickhits/slow").unwrap();
    let v = refused(&r, 504, "server_timeout");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(!message.contains("body"), "{message}");
    assert!(message.contains("nothing was charged"), "{message}");
    assert_eq!(g.spent(), (0, Some(10)));
}

#[test]
fn the_request_deadline_bounds_the_body_and_then_the_handler_apart() {
    // A body that takes 0.6 s of a 1 s deadline, then a handler that takes 0.7 s: neither
    // is late, so the request succeeds and is charged (one deadline over both said 408).
    use std::io::{Read, Write};
    let g = server_support::Guarded::start(std::time::Duration::from_secs(1));
    let mut conn = std::net::TcpStream::connect(g.addr).unwrap();
    let head = format!(
        "POST /api/v1/quickhits/echo HTTP/1.1\r\nhost: x\r\nx-api-key: {}\r\n\
         connection: close\r\ncontent-length: 10\r\n\r\nhello",
        g.key
    );
    conn.write_all(head.as_bytes()).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(600));
    conn.write_all(b"world").unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("helloworld"), "{answer}");
    assert_eq!(g.spent(), (1, Some(9)));
}

#[test]
fn a_value_of_the_wrong_type_names_the_field_at_fault() {
    // Found by a reviewer: the README promises "an invalid body 400 with the field at
    // fault", but a value of the wrong type named only a line and column.
    let s = Server::start();
    let (_, pasted) = library_key(&s, NewKey::new(s.account.as_str(), "pasted"));
    let q = "/api/v1/quickhits/create";
    let long = format!(r#"{{"prompt":"x","context":[{{"type":"doc","id":5}}],"mode":"{pasted}"}}"#);
    for (path, body, field) in [
        (q, r#"{"prompt":5}"#, "`prompt`"),
        (q, r#"{"prompt":"x","mode":"wide"}"#, "`mode`"),
        (
            "/api/v1/quizzes/create",
            r#"{"prompt":"x","length":"10"}"#,
            "`length`",
        ),
        ("/v2/keys", r#"{"name":"n","ips":"10.0.0.1"}"#, "`ips`"),
        (
            q,
            r#"{"prompt":"x","context":[{"type":"doc","id":5}]}"#,
            "`context[0]",
        ),
        // A key sent as the value: hidden, and the field still named.
        (q, &long, "`context[0]"),
    ] {
        let r = s.json("POST", path, &s.admin, body);
        let v = r.json();
        let message = if path.starts_with("/v2/") {
            managed_refused(&r, 400, "invalid_request");
            v["errors"][0]["message"].as_str().unwrap().to_owned()
        } else {
            refused(&r, 400, "invalid_request");
            v["error"]["message"].as_str().unwrap().to_owned()
        };
        assert!(
            message.contains(field),
            "{path} {body}: the 400 does not name {field}: {message}"
        );
    }
    let body = format!(r#"{{"prompt":"x","mode":"{pasted}"}}"#);
    let r = s.json("POST", q, &s.admin, &body);
    assert!(r.body.contains("`mode`"), "{}", r.body);
    s.assert_no_secrets(&[&pasted]);
}

/// Every 401 carries `WWW-Authenticate` and every 429 `Retry-After`, on both surfaces and
/// for each way a key can be refused (found by a reviewer: only `missing_key` on the
/// generation surface was checked).
#[test]
fn every_401_and_429_carries_its_header_on_both_surfaces() {
    let s = Server::start();
    let acct = s.account.as_str();
    let make = |new: NewKey| s.ledger.keys().create(new).unwrap();
    let gone = make(NewKey::new(acct, "gone").permissions(["*"]));
    s.ledger.keys().delete(&gone.info.id).unwrap();
    let off = make(NewKey::new(acct, "off").permissions(["*"]));
    s.ledger.keys().disable(&off.info.id).unwrap();
    let limited = make(
        NewKey::new(acct, "slow")
            .permissions(["*"])
            .rate_limit("requests", 1, 60),
    );
    let mut typo = s.admin.clone();
    let last = typo.pop().unwrap();
    typo.push(if last == 'a' { 'b' } else { 'a' });
    let unauthorized = [
        String::new(),
        typo,
        gone.plaintext.expose().to_owned(),
        off.plaintext.expose().to_owned(),
    ];
    let (q, body) = ("/api/v1/quickhits/create", QUICKHIT);
    for key in &unauthorized {
        let sent = [s.json("POST", q, key, body), s.get("GET", "/v2/keys", key)];
        for r in sent {
            assert_eq!(r.status, 401, "{}", r.body);
            assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{}", r.body);
        }
    }
    let key = limited.plaintext.expose();
    assert_eq!(s.get("GET", "/v2/keys", key).status, 200);
    for r in [s.get("GET", "/v2/keys", key), s.json("POST", q, key, body)] {
        assert_eq!(r.status, 429, "{}", r.body);
        let after = r.header("retry-after").and_then(|v| v.parse::<u64>().ok());
        assert!(after.is_some_and(|secs| secs >= 1), "{}", r.body);
    }
}

/// The guard commits only a 2xx: a handler's 5xx, its panic, and a client gone before the
/// answer are not charged (found by a reviewer: no handler of the example answers 5xx, so
/// a guard that committed every non-4xx passed every test).
#[test]
fn a_handler_that_fails_panics_or_loses_its_client_is_not_charged() {
    use std::io::Write;
    use std::time::Duration;
    let g = server_support::Guarded::start(Duration::from_secs(30));
    for _ in 0..3 {
        assert_eq!(g.post("/api/v1/quickhits/fail").unwrap().status, 502);
    }
    assert_eq!(g.spent(), (0, Some(10)), "a 5xx was charged");
    // The panic ends the connection: no answer.
    assert!(g.post("/api/v1/quickhits/panic").is_err());
    // A client that leaves while the handler (1.5 s) works.
    let mut conn = std::net::TcpStream::connect(g.addr).unwrap();
    let head = format!(
        "POST /api/v1/quickhits/slow HTTP/1.1\r\nhost: x\r\nx-api-key: {}\r\n\
         content-length: 0\r\n\r\n",
        g.key
    );
    conn.write_all(head.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    drop(conn);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        g.spent(),
        (0, Some(10)),
        "a panic or a client gone was charged"
    );
    // The same handler, answered, is charged: the checks above can fail.
    let r = g.post("/api/v1/quickhits/slow").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(g.spent(), (1, Some(9)));
}

/// A launch on a fresh database at `path` under `master`, listening on `addr`, shut down as
/// soon as it serves: what it printed, and how it ended.
fn launch(
    addr: std::net::SocketAddr,
    path: &std::path::Path,
    master: &str,
) -> (String, Result<(), String>) {
    let config = keyledger::Config::builder()
        .master_key(keyledger::MasterKey::parse(master).unwrap())
        .build()
        .unwrap();
    let launch = app::start::Launch {
        addr,
        auth: AuthMode::On,
        path: path.to_owned(),
        config,
        description: "database: test".into(),
    };
    let mut out = Vec::new();
    let ended = app::start::launch(launch, &mut out, async {});
    (String::from_utf8(out).unwrap(), ended)
}

#[test]
fn a_fresh_database_prints_its_admin_key_only_once_the_port_is_bound() {
    // Found by a reviewer: the admin key was minted and printed before the listener was
    // bound, so with the port taken it was lost: the next start found an account and
    // printed no key.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    let master = keyledger::MasterKey::generate().unwrap().to_hex();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (printed, ended) = launch(taken.local_addr().unwrap(), &path, master.expose());
    let refused = ended.unwrap_err();
    assert!(refused.starts_with("listen on"), "{refused}");
    assert!(!printed.contains("admin key"), "{printed}");
    drop(taken);
    // The next start, on a free port, prints the key once it listens, and closes the ledger.
    let free = "127.0.0.1:0".parse().unwrap();
    let (printed, ended) = launch(free, &path, master.expose());
    ended.unwrap();
    let listening = printed
        .find("listening on http://127.0.0.1:")
        .expect(&printed);
    let key = printed.find("\nadmin key: ").expect(&printed);
    assert!(listening < key, "{printed}");
    let (printed, ended) = launch(free, &path, master.expose());
    ended.unwrap();
    assert!(printed.contains("existing database"), "{printed}");
}

#[test]
fn a_key_given_as_the_database_path_or_auth_mode_is_never_printed() {
    // Found by a reviewer: with KEYLEDGER_DB and KEYLEDGER_MASTER_KEY swapped, the banner
    // printed the master key as the database's path; `KEYLEDGER_AUTH=<value>` was echoed.
    use app::start::{auth_mode, shown_path};
    use std::path::Path;
    let s = Server::start();
    let master = keyledger::MasterKey::generate().unwrap().to_hex();
    let master = master.expose();
    let api = s.admin.as_str();
    let body = &api[api.len() - 30..]; // most of a key, without its prefix
    for path in [
        master.to_owned(),
        format!("/srv/{master}"),
        format!("./{api}.redb"),
        format!("/tmp/{api}/keys.redb"),
    ] {
        let shown = shown_path(Path::new(&path));
        assert!(!shown.contains(&master[..16]), "{shown}");
        assert!(!shown.contains(&body[..16]), "{shown}");
        assert!(shown.contains("not shown"), "{shown}");
    }
    for path in [
        "/var/lib/keyledger/keys.redb",
        "keys-2026-01-01.redb",
        "./keys.redb",
        "/srv/keyledger/production2024keys.redb",
        "/data/550e8400e29b41d4a716446655440000/keys.redb",
    ] {
        assert_eq!(shown_path(Path::new(path)), path);
    }
    for value in [master, api, body] {
        let refused = auth_mode(Some(value.as_ref())).unwrap_err();
        assert!(!refused.contains(&value[..16]), "{refused}");
    }
    let refused = auth_mode(Some("of".as_ref())).unwrap_err();
    assert!(refused.ends_with("not `of`"), "{refused}");
    assert!(matches!(auth_mode(None), Ok(AuthMode::On)));
    assert!(matches!(auth_mode(Some("off".as_ref())), Ok(AuthMode::Off)));
    // The library names a database it cannot open: not one whose path is a key.
    let dir = tempfile::tempdir().unwrap();
    let nowhere = dir.path().join(master).join(api).join("keys.redb");
    let other = keyledger::MasterKey::generate().unwrap().to_hex();
    let (printed, ended) = launch("127.0.0.1:0".parse().unwrap(), &nowhere, other.expose());
    let refused = ended.unwrap_err();
    assert!(
        !refused.contains(&master[..16]) && !refused.contains(&body[..16]),
        "{refused}"
    );
    assert!(printed.is_empty(), "{printed}");
}
