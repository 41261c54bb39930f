//! The credentials vault: OAuth connector credentials and owner secrets, encrypted at rest
//! behind the owner boundary.
