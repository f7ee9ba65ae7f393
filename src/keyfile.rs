//! Loading the shared secret from a key file, refusing one that other users
//! can read (as ssh refuses such private keys).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::wire::{MacKey, MacKeyError};

/// Why a key file was refused.
#[derive(Debug)]
pub enum KeyFileError {
    /// It could not be read.
    Read(PathBuf, io::Error),
    /// Group or other users have some access to it.
    TooOpen(PathBuf, u32),
    /// It is a directory.
    NotAFile(PathBuf),
    /// It is not 16 to 64 bytes long.
    Length(PathBuf, MacKeyError),
}

impl fmt::Display for KeyFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyFileError::Read(p, e) => write!(f, "cannot read key file {}: {e}", p.display()),
            KeyFileError::TooOpen(p, mode) => write!(
                f,
                "key file {} is accessible by other users (mode {mode:04o}); run: chmod 600 {}",
                p.display(),
                p.display()
            ),
            KeyFileError::NotAFile(p) => write!(
                f,
                "key file {} is a directory, not a file: give the path of the key file itself",
                p.display()
            ),
            KeyFileError::Length(p, e) => write!(
                f,
                "key file {}: {e} (the file holds the raw key bytes; make one with: head -c 32 /dev/urandom > FILE)",
                p.display()
            ),
        }
    }
}

impl std::error::Error for KeyFileError {}

/// Reads a key file: the raw key bytes, 16 to 64 of them, in a file only
/// its owner can access. One exception: a file directly in systemd's
/// `$CREDENTIALS_DIRECTORY` (`LoadCredential=`) may also be group-readable,
/// since systemd 254 grants a `DynamicUser=` service its credentials
/// through an ACL that shows as mode 0440, in a directory only the service
/// can enter.
pub fn load(path: &Path) -> Result<MacKey, KeyFileError> {
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    load_with(path, credentials.as_deref())
}

/// [`load`], with systemd's credentials directory given.
fn load_with(path: &Path, credentials: Option<&Path>) -> Result<MacKey, KeyFileError> {
    let meta = std::fs::metadata(path).map_err(|e| KeyFileError::Read(path.into(), e))?;
    if meta.is_dir() {
        return Err(KeyFileError::NotAFile(path.into()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        let allowed = if is_credential(path, credentials) {
            0o040
        } else {
            0
        };
        if mode & 0o077 & !allowed != 0 {
            return Err(KeyFileError::TooOpen(path.into(), mode));
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    let secret = std::fs::read(path).map_err(|e| KeyFileError::Read(path.into(), e))?;
    MacKey::new(&secret).map_err(|e| KeyFileError::Length(path.into(), e))
}

/// Whether `path` names a file directly inside `credentials`, systemd's
/// per-service credentials directory.
fn is_credential(path: &Path, credentials: Option<&Path>) -> bool {
    let Some(credentials) = credentials else {
        return false;
    };
    // Canonical first, so a relative path ("key", run from that
    // directory) or one through a symlink is judged by where it leads.
    let (Ok(path), Ok(credentials)) = (path.canonicalize(), credentials.canonicalize()) else {
        return false;
    };
    path.parent() == Some(credentials.as_path())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_refused_as_a_directory() {
        let dir = std::env::temp_dir();
        let err = load(&dir).unwrap_err();
        assert!(matches!(err, KeyFileError::NotAFile(_)));
        let text = err.to_string();
        assert!(text.contains("is a directory"), "{text}");
        assert!(!text.contains("chmod"), "{text}");
    }

    #[test]
    fn only_systemd_credentials_may_be_group_readable() {
        let key = temp_key("credential", &[1; 32], 0o440);
        let dir = key.parent().unwrap().to_path_buf();
        assert!(is_credential(&key, Some(&dir)));
        assert!(!is_credential(&key, None));
        assert!(!is_credential(&key, Some(Path::new("/nonexistent"))));
        // Inside the credentials directory 0440 loads; outside (or with
        // other bits) it is refused as before.
        assert!(load_with(&key, Some(&dir)).is_ok());
        assert!(matches!(
            load_with(&key, None),
            Err(KeyFileError::TooOpen(_, 0o440))
        ));
        let open = temp_key("credential-open", &[1; 32], 0o444);
        assert!(matches!(
            load_with(&open, Some(&dir)),
            Err(KeyFileError::TooOpen(_, 0o444))
        ));
    }
    use std::os::unix::fs::PermissionsExt;

    fn temp_key(name: &str, bytes: &[u8], mode: u32) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tether-keyfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn accepts_private_key_of_valid_length() {
        assert!(load(&temp_key("ok", &[1; 32], 0o600)).is_ok());
        assert!(load(&temp_key("ro", &[1; 16], 0o400)).is_ok());
    }

    #[test]
    fn refuses_readable_by_others_with_chmod_hint() {
        let err = load(&temp_key("open", &[1; 32], 0o644)).unwrap_err();
        assert!(matches!(err, KeyFileError::TooOpen(_, 0o644)));
        assert!(err.to_string().contains("chmod 600"));
        assert!(matches!(
            load(&temp_key("group", &[1; 32], 0o640)).unwrap_err(),
            KeyFileError::TooOpen(_, 0o640)
        ));
    }

    #[test]
    fn refuses_wrong_length_and_missing_file() {
        assert!(matches!(
            load(&temp_key("short", &[1; 15], 0o600)).unwrap_err(),
            KeyFileError::Length(..)
        ));
        assert!(matches!(
            load(&temp_key("long", &[1; 65], 0o600)).unwrap_err(),
            KeyFileError::Length(..)
        ));
        assert!(matches!(
            load(Path::new("/nonexistent/tether.key")).unwrap_err(),
            KeyFileError::Read(..)
        ));
    }
}
