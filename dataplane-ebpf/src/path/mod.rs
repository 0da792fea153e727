//! One `try_*` pipeline per hook; each returns the verdict its entry point turns into an action.
pub mod external;
pub mod pod;
pub mod sock;
