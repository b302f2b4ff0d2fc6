//! `dsu keygen` and `dsu sign`: the signing side of `docs/security.md`.

use std::path::{Path, PathBuf};

use clap::Args;
use dsu_agent::trust::SecretKey;

use crate::error::CliError;
use crate::patch::{read_file, write_file};

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// The secret key file to write (mode 0600); the public key goes to `KEY.pub`.
    #[arg(long, value_name = "KEY")]
    out: PathBuf,
    /// A comment stored with the public key (who it belongs to).
    #[arg(long, value_name = "TEXT", default_value = "")]
    comment: String,
}

#[derive(Debug, Args)]
pub struct SignArgs {
    /// The patch to sign (an ELF relocatable object, signed or not).
    #[arg(value_name = "PATCH")]
    patch: PathBuf,
    /// The secret key file `dsu keygen` wrote.
    #[arg(long, value_name = "KEY")]
    key: PathBuf,
    /// Where to write the signed patch; PATCH itself (replaced atomically) by default.
    #[arg(short, long, value_name = "OUT")]
    out: Option<PathBuf>,
}

/// `dsu keygen`: a new ed25519 key pair from the OS's random source.
pub fn keygen(args: &KeygenArgs) -> Result<(), CliError> {
    let mut seed = [0u8; 32];
    // getrandom(2) behind /dev/urandom: never blocks once the pool is initialised.
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
        .map_err(|e| CliError::File {
            what: "cannot read randomness from",
            path: "/dev/urandom".into(),
            reason: e.to_string(),
        })?;
    let secret = SecretKey::from_seed(seed);
    seed.fill(0);
    let public = secret.public(args.comment.trim());
    let pub_path = public_path(&args.out);
    write_file(
        "cannot write secret key",
        &args.out,
        format!("{}\n", secret.to_line()).as_bytes(),
        0o600,
        true,
    )?;
    write_file(
        "cannot write public key",
        &pub_path,
        format!("{}\n", public.to_line()).as_bytes(),
        0o644,
        true,
    )?;
    crate::output::print_line(format_args!(
        "key {}: secret key {}, public key {}",
        public.id(),
        args.out.display(),
        pub_path.display()
    ));
    Ok(())
}

/// `dsu sign`: appends (or replaces) the signature trailer.
pub fn sign(args: &SignArgs) -> Result<(), CliError> {
    let key_text = read_file("cannot read key", &args.key)?;
    let secret = std::str::from_utf8(&key_text)
        .map_err(|e| e.to_string())
        .and_then(SecretKey::parse)
        .map_err(|reason| CliError::File {
            what: "not a dsu secret key:",
            path: args.key.clone(),
            reason,
        })?;
    let patch = read_file("cannot read patch", &args.patch)?;
    if !patch.starts_with(b"\x7fELF") {
        return Err(CliError::NotElf {
            path: args.patch.clone(),
        });
    }
    let signed = secret.sign(&patch).map_err(|e| CliError::File {
        what: "cannot sign",
        path: args.patch.clone(),
        reason: e.to_string(),
    })?;
    let out = args.out.as_ref().unwrap_or(&args.patch);
    write_file("cannot write signed patch", out, &signed, 0o644, false)?;
    crate::output::print_line(format_args!(
        "signed {} with key {}",
        out.display(),
        secret.public("").id()
    ));
    Ok(())
}

/// `KEY.pub` for `KEY`.
fn public_path(key: &Path) -> PathBuf {
    let mut name = key.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}
