//! Device password hashes: argon2id PHC strings, made by `trainrelay passwd` and checked when
//! the config is read. Verifying a login against a hash is [`crate::auth`]'s.

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::Argon2;

/// What is wrong with a password hash, or why one could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("not a PHC hash string: {0}")]
    NotPhc(argon2::password_hash::Error),
    #[error("algorithm '{0}' is not argon2")]
    NotArgon2(String),
    #[error("cannot hash the password: {0}")]
    Hash(argon2::password_hash::Error),
}

/// Checks that `hash` is an argon2 PHC string.
pub fn check_hash(hash: &str) -> Result<(), PasswordError> {
    let parsed = PasswordHash::new(hash).map_err(PasswordError::NotPhc)?;
    if !parsed.algorithm.as_str().starts_with("argon2") {
        return Err(PasswordError::NotArgon2(
            parsed.algorithm.as_str().to_string(),
        ));
    }
    Ok(())
}

/// Hashes a password with argon2id and a random salt (PHC string).
pub fn hash_password(password: &[u8]) -> Result<String, PasswordError> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(PasswordError::Hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::PasswordVerifier;

    #[test]
    fn hash_and_verify() {
        let h = hash_password(b"secret").expect("hash");
        assert!(check_hash(&h).is_ok());
        assert!(check_hash("plain").is_err());
        let parsed = PasswordHash::new(&h).expect("parse");
        assert!(Argon2::default()
            .verify_password(b"secret", &parsed)
            .is_ok());
        assert!(Argon2::default()
            .verify_password(b"secreT", &parsed)
            .is_err());
    }
}
