//! `sqlx::migrate!` embeds the migration files at compile time, but on
//! stable Rust it cannot tell Cargo to watch them: without this, an edited
//! migration is not compiled in until something else in the crate changes.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
