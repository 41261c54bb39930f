//! Cursor pagination shared by every listing.

use serde::Serialize;

/// Default page size.
pub const DEFAULT_LIMIT: usize = 25;
/// Largest page size.
pub const MAX_LIMIT: usize = 100;

/// How much of a listing to return.
#[derive(Debug, Clone, Default)]
pub struct PageRequest {
    /// Items per page: default 25, at most 100.
    pub limit: Option<usize>,
    /// The `next_cursor` of the previous page, or `None` for the first page.
    pub cursor: Option<String>,
}

impl PageRequest {
    /// The first page with the default size.
    pub fn first() -> Self {
        PageRequest::default()
    }

    /// Sets the page size.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Continues after a previous page.
    pub fn after(mut self, cursor: impl Into<String>) -> Self {
        self.cursor = Some(cursor.into());
        self
    }

    pub(crate) fn checked_limit(&self) -> Result<usize, crate::Error> {
        match self.limit {
            None => Ok(DEFAULT_LIMIT),
            Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            Some(n) => Err(crate::Error::invalid(
                "limit",
                format!("must be 1–{MAX_LIMIT}, got {n}"),
            )),
        }
    }
}

/// One page of a listing. Items are in creation order; items created while paging appear on
/// later pages, never twice.
#[derive(Debug, Clone, Serialize)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// Opaque cursor for the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}
