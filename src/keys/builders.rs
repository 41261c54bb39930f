//! Builders for creating, importing and updating keys.

use std::collections::BTreeMap;

use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::clock::Timestamp;
use crate::record::{Limits, RateLimit, Refill, RefillInterval, TokenWindow};

/// Settings shared by new and imported keys.
#[derive(Debug, Clone, Default)]
pub(crate) struct Settings {
    pub owner: String,
    pub name: String,
    pub token_type: Option<String>,
    pub test: bool,
    pub permissions: Vec<String>,
    pub ips: Vec<String>,
    pub expires_at: Option<Timestamp>,
    pub limits: Limits,
    pub metadata: BTreeMap<String, String>,
    pub pool: Option<String>,
}

macro_rules! settings_setters {
    ($t:ty) => {
        impl $t {
            /// Scopes the key grants (`quickhits:create`, `quickhits:*`, `*`).
            pub fn permissions<I: IntoIterator<Item = S>, S: Into<String>>(
                mut self,
                items: I,
            ) -> Self {
                self.settings.permissions = items.into_iter().map(Into::into).collect();
                self
            }

            /// Client IP allowlist: addresses and CIDR ranges. Empty (the default) allows any.
            /// A client is matched in canonical form (`::ffff:a.b.c.d` as `a.b.c.d`), so an
            /// IPv6 range, `::/0` included, admits IPv6 clients only.
            pub fn ips<I: IntoIterator<Item = S>, S: Into<String>>(mut self, items: I) -> Self {
                self.settings.ips = items.into_iter().map(Into::into).collect();
                self
            }

            /// When the key stops working: a time in the future (a time already past is
            /// refused as [`Error::InvalidInput`](crate::Error::InvalidInput)).
            pub fn expires_at(mut self, at: Timestamp) -> Self {
                self.settings.expires_at = Some(at);
                self
            }

            /// Starting credits; without this the key is unmetered.
            pub fn credits(mut self, credits: u64) -> Self {
                self.settings.limits.credits = Some(credits);
                self
            }

            /// Replaces the balance with `amount` every `interval`. What a balance was ever
            /// granted is counted to `u64::MAX`: a refill gives what still fits under it, so
            /// refills of near `u64::MAX` ("unlimited") stop once that much has been spent.
            pub fn refill(mut self, amount: u64, interval: RefillInterval) -> Self {
                self.settings.limits.refill = Some(Refill { amount, interval });
                self
            }

            /// Adds a named rate limit: `limit` requests per `window_secs`.
            pub fn rate_limit(
                mut self,
                name: impl Into<String>,
                limit: u64,
                window_secs: u64,
            ) -> Self {
                self.settings.limits.rate_limits.push(RateLimit {
                    name: name.into(),
                    limit,
                    window_secs,
                });
                self
            }

            /// Sets the token window: `tokens` of cost per `window_secs`.
            pub fn token_window(mut self, tokens: u64, window_secs: u64) -> Self {
                self.settings.limits.token_window = Some(TokenWindow {
                    tokens,
                    window_secs,
                });
                self
            }

            /// Adds a metadata entry (not secret: it is shown in listings).
            pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
                self.settings.metadata.insert(key.into(), value.into());
                self
            }

            /// Spends from a shared credit pool (`pool_…`) instead of an own balance.
            pub fn pool(mut self, pool: impl Into<String>) -> Self {
                self.settings.pool = Some(pool.into());
                self
            }

            /// Emits a low-balance event when the credits left fall to or below `threshold`.
            pub fn low_balance_threshold(mut self, threshold: u64) -> Self {
                self.settings.limits.low_balance_threshold = Some(threshold);
                self
            }

            /// Makes it a test key (`vb_test_…`). Keys only: a token so marked is refused
            /// as [`Error::InvalidInput`](crate::Error::InvalidInput) (tokens have no test
            /// mode).
            pub fn test(mut self) -> Self {
                self.settings.test = true;
                self
            }
        }
    };
}

/// A key or token to create. The plaintext is generated and returned once.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub(crate) settings: Settings,
}

impl NewKey {
    /// An API key for `owner` (an account's public id) named `name` (1–50 characters).
    pub fn new(owner: impl Into<String>, name: impl Into<String>) -> Self {
        NewKey {
            settings: Settings {
                owner: owner.into(),
                name: name.into(),
                ..Settings::default()
            },
        }
    }

    /// An internal token of type `token_type` (required) for `owner`, named `name`.
    pub fn token(
        owner: impl Into<String>,
        token_type: impl Into<String>,
        name: impl Into<String>,
    ) -> Self {
        let mut new = NewKey::new(owner, name);
        new.settings.token_type = Some(token_type.into());
        new
    }
}

settings_setters!(NewKey);

/// The hash of a key issued by another system, to import so its holder keeps using it.
/// `Debug` shows the scheme, never the hash: a plain SHA-256 of a short legacy key is enough
/// to find the key offline, and is all a lookup needs. For the same reason the digest is
/// wiped when the value is dropped (so it is `Clone`, not `Copy`: each copy is wiped on its
/// own). The array passed in is a copy the caller still holds: build it in place, e.g.
/// `ImportedHash::Sha256(Sha256::digest(key).into())`, or wipe the caller's own.
/// Equality compares the digests in constant time.
#[derive(Clone, Eq, Zeroize, ZeroizeOnDrop)]
pub enum ImportedHash {
    /// Plain `SHA-256(key)`. The file stores it keyed with the master key, never as given;
    /// rehashed to the current scheme on the key's first successful use.
    Sha256([u8; 32]),
    /// A hash under this ledger's current scheme (e.g. exported from another keyledger file
    /// opened with the same master key, under the same scheme: a BLAKE3 hash written before
    /// format 4 is not one, its key differs).
    Current([u8; 32]),
}

impl PartialEq for ImportedHash {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (ImportedHash::Sha256(a), ImportedHash::Sha256(b))
            | (ImportedHash::Current(a), ImportedHash::Current(b)) => bool::from(a.ct_eq(b)),
            _ => false,
        }
    }
}

impl std::fmt::Debug for ImportedHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImportedHash::Sha256(_) => "Sha256(***)",
            ImportedHash::Current(_) => "Current(***)",
        })
    }
}

/// A key to import by its hash, with its visible prefix and suffix as the old system showed them.
#[derive(Debug, Clone)]
pub struct ImportKey {
    pub(crate) settings: Settings,
    pub(crate) hash: ImportedHash,
    pub(crate) prefix: String,
    pub(crate) suffix: String,
}

impl ImportKey {
    /// An API key for `owner` named `name`, known by `hash`; `prefix` and `suffix` are the
    /// visible parts support staff will search by: the prefix starts with a configured key
    /// prefix or legacy prefix and holds at most 12 characters (or that key prefix and 4
    /// more, when longer), the suffix at most 4.
    pub fn new(
        owner: impl Into<String>,
        name: impl Into<String>,
        hash: ImportedHash,
        prefix: impl Into<String>,
        suffix: impl Into<String>,
    ) -> Self {
        ImportKey {
            settings: Settings {
                owner: owner.into(),
                name: name.into(),
                ..Settings::default()
            },
            hash,
            prefix: prefix.into(),
            suffix: suffix.into(),
        }
    }
}

impl ImportKey {
    /// Imports an internal token of type `token_type` instead of an API key (through
    /// [`Ledger::tokens`](crate::Ledger::tokens)).
    pub fn token_type(mut self, token_type: impl Into<String>) -> Self {
        self.settings.token_type = Some(token_type.into());
        self
    }
}

settings_setters!(ImportKey);

/// A partial update: only the fields set are changed.
#[derive(Debug, Clone, Default)]
pub struct KeyUpdate {
    pub(crate) name: Option<String>,
    pub(crate) permissions: Option<Vec<String>>,
    pub(crate) ips: Option<Vec<String>>,
    pub(crate) expires_at: Option<Option<Timestamp>>,
    pub(crate) credits: Option<Option<u64>>,
    pub(crate) refill: Option<Option<Refill>>,
    pub(crate) rate_limits: Option<Vec<RateLimit>>,
    pub(crate) token_window: Option<Option<TokenWindow>>,
    pub(crate) metadata: Option<BTreeMap<String, String>>,
    pub(crate) low_balance_threshold: Option<Option<u64>>,
    pub(crate) pool: Option<Option<String>>,
}

impl KeyUpdate {
    /// An empty update.
    pub fn new() -> Self {
        Self::default()
    }

    /// New name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Replaces the permissions.
    pub fn permissions<I: IntoIterator<Item = S>, S: Into<String>>(mut self, items: I) -> Self {
        self.permissions = Some(items.into_iter().map(Into::into).collect());
        self
    }

    /// Replaces the IP allowlist (empty allows any address; IPv6 ranges admit IPv6 clients
    /// only, as on creation).
    pub fn ips<I: IntoIterator<Item = S>, S: Into<String>>(mut self, items: I) -> Self {
        self.ips = Some(items.into_iter().map(Into::into).collect());
        self
    }

    /// Sets (`Some`, a time in the future; a past one is refused as
    /// [`Error::InvalidInput`](crate::Error::InvalidInput)) or clears (`None`) the expiry.
    pub fn expires_at(mut self, at: Option<Timestamp>) -> Self {
        self.expires_at = Some(at);
        self
    }

    /// Sets (`Some`) or clears (`None`) the low-balance threshold of the key's own balance:
    /// an event is sent when the credits left fall from above it to or below it. Applies to
    /// the very next spend; a threshold above what is left now reports nothing until a
    /// top-up lifts the balance over it. (A key spending from a pool uses the pool's.)
    pub fn low_balance_threshold(mut self, threshold: Option<u64>) -> Self {
        self.low_balance_threshold = Some(threshold);
        self
    }

    /// Sets the credit balance (`Some`) or drops it (`None`): the credits left on it, its
    /// refill and its low-balance threshold go with it, and the key is unmetered — or, with
    /// [`pool`](Self::pool)`(Some(…))` in the same update, spends from that pool.
    pub fn credits(mut self, credits: Option<u64>) -> Self {
        self.credits = Some(credits);
        self
    }

    /// Sets (`Some`) or clears (`None`) the refill. New terms start with the next period of
    /// their own interval; the balance of this one stays. Refills apply lazily, at the next
    /// spend: one that was due under the old terms and not applied yet is applied on the new
    /// ones — and, once the refill is cleared, not at all (the balance stays as it is, though
    /// `usage` counted that refill as applied before).
    pub fn refill(mut self, refill: Option<Refill>) -> Self {
        self.refill = Some(refill);
        self
    }

    /// Replaces the named rate limits.
    pub fn rate_limits(mut self, limits: Vec<RateLimit>) -> Self {
        self.rate_limits = Some(limits);
        self
    }

    /// Sets or clears the token window.
    pub fn token_window(mut self, window: Option<TokenWindow>) -> Self {
        self.token_window = Some(window);
        self
    }

    /// Moves the key to the owner's credit pool `pool_…` (`Some`), or out of its pool
    /// (`None`: unmetered, or on a balance of its own given with [`credits`](Self::credits)
    /// in the same update). Applies to the very next verify; grants already held settle
    /// where they reserved.
    ///
    /// A key with a balance of its own joins a pool only in an update that also drops that
    /// balance with `credits(None)`: the credits left on it are not moved (add them to the
    /// pool first with [`Credits::top_up`](crate::Credits::top_up) to keep them).
    pub fn pool(mut self, pool: Option<&str>) -> Self {
        self.pool = Some(pool.map(str::to_owned));
        self
    }

    /// Replaces the metadata.
    pub fn metadata(mut self, metadata: BTreeMap<String, String>) -> Self {
        self.metadata = Some(metadata);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::ImportedHash;

    /// Equal only for the same scheme and every byte of the digest, the last one included.
    #[test]
    fn imported_hashes_are_equal_by_scheme_and_every_byte() {
        let digest = [7u8; 32];
        let mut last_differs = digest;
        last_differs[31] ^= 1;
        assert_eq!(ImportedHash::Sha256(digest), ImportedHash::Sha256(digest));
        assert_eq!(ImportedHash::Current(digest), ImportedHash::Current(digest));
        assert_ne!(
            ImportedHash::Sha256(digest),
            ImportedHash::Sha256(last_differs)
        );
        assert_ne!(
            ImportedHash::Current(digest),
            ImportedHash::Current(last_differs)
        );
        assert_ne!(ImportedHash::Sha256(digest), ImportedHash::Current(digest));
    }
}
