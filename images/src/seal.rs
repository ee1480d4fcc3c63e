//! Convergent encryption of blocks: capsules a server cannot read.
//!
//! A sealed block's plaintext `p` (one image block, compressed if that helps) is encrypted
//! with a key derived from its own hash, so equal blocks still make equal ciphertexts and
//! deduplicate, while the server, which never learns `P = BLAKE3(p)`, cannot decrypt:
//!
//! ```text
//!   P    = BLAKE3(p)                                   plaintext hash (never leaves the owner)
//!   K    = BLAKE3-derive_key("capsule 2026-11 block key v1", S || P)
//!          S: the owner's convergence secret, or 32 zero bytes without one
//!   c    = "CSEL" | version 1 | encoding (0 raw, 1 zstd) | 0 0 | len(p) u32 LE
//!          | AES-256-GCM-SIV(K, nonce 0, aad = those 12 bytes, zstd?(p))
//!   name = BLAKE3(c)                                   what the server stores it under
//! ```
//! The fixed nonce is sound because a key encrypts one plaintext only: `K` is a function
//! of `p`, so the same key always meets the same `p` (and the same ciphertext comes out,
//! which is the point). GCM-SIV also stays safe if one `p` were ever compressed two ways
//! under one key: its nonce misuse reveals only that two messages are equal.
//!
//! The map entry of a sealed block is [`Entry::Sealed`]: the block's `name` in the clear
//! (servers walk maps to push, pull and collect garbage) and `P` masked with a pad only the
//! owner's [`Key`] can make, `BLAKE3-keyed(mask key, name)`. A reader unmasks `P`, derives
//! `K`, decrypts, and checks the plaintext hashes to `P`; a failed tag or hash is a corrupt
//! block (EIO on a mount), never wrong bytes.

use aes_gcm_siv::aead::{AeadInPlace, KeyInit};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use serde::{Deserialize, Serialize};

use crate::block::{self, MAX_BLOCK_SIZE};
use crate::error::{Error, ErrorKind, Result};
use crate::hash::Hash;
use crate::map::Entry;

const MAGIC: &[u8; 4] = b"CSEL";
const VERSION: u8 = 1;
const HEADER_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Bytes a sealed block may exceed its plaintext by (header and tag): a stored block of
/// ciphertext may be this much over [`MAX_BLOCK_SIZE`].
pub const SEAL_OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// The one sealing scheme: the derivations and cipher above.
pub const SCHEME: u8 = 1;

const BLOCK_KEY_CONTEXT: &str = "capsule 2026-11 block key v1";
const MASK_KEY_CONTEXT: &str = "capsule 2026-11 entry mask key v1";
const KEY_ID_CONTEXT: &str = "capsule 2026-11 key id v1";
const MANIFEST_KEY_CONTEXT: &str = "capsule 2026-11 manifest key v1";
const SECRETS_AAD: &[u8] = b"capsule manifest secrets v1";
/// Largest sealed secrets blob opened (a manifest is capped at 1 MiB anyway).
const MAX_SECRETS: usize = 1 << 20;

/// A key's public name: 8 bytes derived from its secret, written in a sealed capsule's
/// manifest so a client knows which key opens it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyId(pub [u8; 8]);

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// What a sealed capsule's manifest says in the clear about its sealing, and the parts of
/// the manifest it hides (see [`Key::seal_secrets`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealing {
    /// [`SCHEME`].
    pub scheme: u8,
    /// The owner's key that opens it.
    pub key_id: KeyId,
    /// Whether block keys mix in the key's convergence secret.
    pub convergence: bool,
    /// The manifest's hidden fields, sealed to the owner's key (empty: none).
    pub secrets: Vec<u8>,
}

/// An owner's key: a metadata secret (masks plaintext hashes in maps; names the key) and
/// an optional convergence secret mixed into every block key.
#[derive(Clone)]
pub struct Key {
    id: KeyId,
    mask_key: [u8; 32],
    secret: [u8; 32],
    convergence: Option<[u8; 32]>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key").field("id", &self.id).field("convergence", &self.convergence.is_some()).finish_non_exhaustive()
    }
}

/// A block sealed for the store.
#[derive(Debug)]
pub struct SealedBlock {
    /// Its map entry.
    pub entry: Entry,
    /// Its stored name (hash of `ciphertext`).
    pub name: Hash,
    /// What the store keeps.
    pub ciphertext: Vec<u8>,
}

fn random_32() -> Result<[u8; 32]> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| Error::new(ErrorKind::Io, format!("no randomness from the operating system: {e}")))?;
    Ok(b)
}

impl Key {
    /// A key from its secrets.
    pub fn from_secrets(secret: [u8; 32], convergence: Option<[u8; 32]>) -> Self {
        let id_bytes = blake3::derive_key(KEY_ID_CONTEXT, &secret);
        let mut id = [0u8; 8];
        id.copy_from_slice(&id_bytes[..8]);
        Self { id: KeyId(id), mask_key: blake3::derive_key(MASK_KEY_CONTEXT, &secret), secret, convergence }
    }

    /// A new random key, with a random convergence secret if asked.
    pub fn generate(convergence: bool) -> Result<Self> {
        let conv = if convergence { Some(random_32()?) } else { None };
        Ok(Self::from_secrets(random_32()?, conv))
    }

    /// Its public id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The metadata secret.
    pub fn secret(&self) -> &[u8; 32] {
        &self.secret
    }

    /// The convergence secret, if any.
    pub fn convergence_secret(&self) -> Option<&[u8; 32]> {
        self.convergence.as_ref()
    }

    /// The manifest header of a capsule sealed with this key (no secrets yet).
    pub fn sealing(&self) -> Sealing {
        Sealing { scheme: SCHEME, key_id: self.id, convergence: self.convergence.is_some(), secrets: Vec::new() }
    }

    fn manifest_cipher(&self) -> Aes256GcmSiv {
        Aes256GcmSiv::new(&blake3::derive_key(MANIFEST_KEY_CONTEXT, &self.secret).into())
    }

    /// Seals a manifest's hidden fields: a random nonce, then AES-256-GCM-SIV under a key
    /// derived from the owner's secret (not convergent: nothing to deduplicate here).
    pub fn seal_secrets(&self, plain: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&random_32()?[..12]);
        let mut body = plain.to_vec();
        self.manifest_cipher()
            .encrypt_in_place(Nonce::from_slice(&nonce), SECRETS_AAD, &mut body)
            .map_err(|_| Error::invalid("manifest secrets too large to seal"))?;
        Ok([nonce.as_slice(), &body].concat())
    }

    /// Opens what [`Key::seal_secrets`] sealed; a failed tag is a corrupt manifest.
    pub fn open_secrets(&self, sealed: &[u8], capsule: &str) -> Result<Vec<u8>> {
        if sealed.len() < 12 + TAG_LEN || sealed.len() > MAX_SECRETS {
            return Err(Error::corrupt(format!("capsule {capsule}: sealed manifest fields of {} bytes", sealed.len())));
        }
        let (nonce, body) = sealed.split_at(12);
        let mut body = body.to_vec();
        self.manifest_cipher()
            .decrypt_in_place(Nonce::from_slice(nonce), SECRETS_AAD, &mut body)
            .map_err(|_| Error::corrupt(format!("capsule {capsule}: its sealed manifest fields fail authentication")))?;
        Ok(body)
    }

    /// Checks this key opens capsules sealed as `sealing`.
    pub fn check_opens(&self, sealing: &Sealing, capsule: &str) -> Result<()> {
        if sealing.scheme != SCHEME {
            return Err(Error::corrupt(format!("capsule {capsule}: unknown sealing scheme {} (this build knows {SCHEME})", sealing.scheme)));
        }
        if sealing.key_id != self.id {
            return Err(Error::new(ErrorKind::NoKey, format!("capsule {capsule} is sealed with key {}, not with key {}", sealing.key_id, self.id)));
        }
        Ok(())
    }

    fn block_key(&self, plain: &Hash) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key(BLOCK_KEY_CONTEXT);
        h.update(self.convergence.as_ref().unwrap_or(&[0; 32]));
        h.update(&plain.0);
        *h.finalize().as_bytes()
    }

    fn mask(&self, name: &Hash, value: &Hash) -> Hash {
        let pad = blake3::keyed_hash(&self.mask_key, &name.0);
        let mut out = value.0;
        out.iter_mut().zip(pad.as_bytes()).for_each(|(o, p)| *o ^= p);
        Hash(out)
    }

    /// Seals one non-zero block whose plaintext hash is `plain`, compressing at `level`.
    pub fn seal(&self, plain: &Hash, raw: &[u8], level: i32) -> Result<SealedBlock> {
        if raw.len() > MAX_BLOCK_SIZE {
            return Err(Error::new(ErrorKind::TooLarge, format!("block of {} bytes exceeds {MAX_BLOCK_SIZE}", raw.len())));
        }
        let compressed = block::zstd_compress(raw, level.clamp(1, block::MAX_LEVEL)).filter(|c| c.len() + 16 < raw.len());
        let (encoding, payload) = match &compressed {
            Some(c) => (1u8, c.as_slice()),
            None => (0u8, raw),
        };
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TAG_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[VERSION, encoding, 0, 0]);
        out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
        let header: [u8; HEADER_LEN] = out[..HEADER_LEN].try_into().unwrap_or_default();
        let mut body = payload.to_vec();
        let cipher = Aes256GcmSiv::new(&self.block_key(plain).into());
        cipher.encrypt_in_place(Nonce::from_slice(&[0; 12]), &header, &mut body).map_err(|_| Error::invalid("block too large to seal"))?;
        out.extend_from_slice(&body);
        let name = Hash::of(&out);
        Ok(SealedBlock { entry: Entry::Sealed { name, masked_plain: self.mask(&name, plain) }, name, ciphertext: out })
    }

    /// The plaintext hash of the sealed block an entry names.
    pub fn plain_hash(&self, name: &Hash, masked_plain: &Hash) -> Hash {
        self.mask(name, masked_plain)
    }

    /// The plaintext of a sealed block (`ciphertext`, already checked to hash to `name`):
    /// decrypted, decompressed within the caps, and checked against its plaintext hash.
    pub fn open(&self, name: &Hash, masked_plain: &Hash, ciphertext: &[u8]) -> Result<Vec<u8>> {
        let bad = |why: String| Error::corrupt(format!("sealed block {name}: {why}"));
        if ciphertext.len() < HEADER_LEN + TAG_LEN {
            return Err(bad(format!("truncated to {} bytes", ciphertext.len())));
        }
        let (header, body) = ciphertext.split_at(HEADER_LEN);
        if &header[..4] != MAGIC {
            return Err(bad("bad magic".into()));
        }
        if header[4] != VERSION {
            return Err(bad(format!("unsupported sealed block version {}", header[4])));
        }
        let plain_len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
        if plain_len > MAX_BLOCK_SIZE || body.len() > MAX_BLOCK_SIZE + TAG_LEN {
            return Err(Error::new(ErrorKind::TooLarge, format!("sealed block {name}: {} bytes declaring {plain_len}, cap {MAX_BLOCK_SIZE}", body.len())));
        }
        let plain = self.plain_hash(name, masked_plain);
        let mut payload = body.to_vec();
        let cipher = Aes256GcmSiv::new(&self.block_key(&plain).into());
        cipher
            .decrypt_in_place(Nonce::from_slice(&[0; 12]), header, &mut payload)
            .map_err(|_| bad("authentication failed (tampered, or not sealed for this map entry)".into()))?;
        let raw = match header[5] {
            0 => payload,
            1 => block::zstd_decompress(&payload, plain_len).map_err(|e| bad(format!("zstd: {e}")))?,
            other => return Err(bad(format!("unknown encoding {other}"))),
        };
        if raw.len() != plain_len {
            return Err(bad(format!("{} bytes, header says {plain_len}", raw.len())));
        }
        if Hash::of(&raw) != plain {
            return Err(bad("plaintext does not hash to its map entry".into()));
        }
        Ok(raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(conv: Option<u8>) -> Key {
        Key::from_secrets([7; 32], conv.map(|c| [c; 32]))
    }

    fn sealed_parts(s: &SealedBlock) -> (Hash, Hash) {
        match s.entry {
            Entry::Sealed { name, masked_plain } => (name, masked_plain),
            _ => panic!("not sealed"),
        }
    }

    proptest! {
        #[test]
        fn round_trip(data in proptest::collection::vec(any::<u8>(), 1..9000), repeat in 1usize..4) {
            let data: Vec<u8> = data.iter().copied().cycle().take(data.len() * repeat).collect();
            let k = key(None);
            let s = k.seal(&Hash::of(&data), &data, 3).unwrap();
            let (name, masked) = sealed_parts(&s);
            prop_assert_eq!(name, Hash::of(&s.ciphertext));
            prop_assert_eq!(k.open(&name, &masked, &s.ciphertext).unwrap(), data);
        }

        #[test]
        fn a_flipped_bit_never_opens(data in proptest::collection::vec(any::<u8>(), 1..3000), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let k = key(Some(1));
            let s = k.seal(&Hash::of(&data), &data, 3).unwrap();
            let (name, masked) = sealed_parts(&s);
            let mut c = s.ciphertext.clone();
            let i = pos.index(c.len());
            c[i] ^= 1 << bit;
            prop_assert!(k.open(&name, &masked, &c).is_err());
        }
    }

    #[test]
    fn convergent_under_one_secret_distinct_across_secrets() {
        let data = b"the same block, twice".repeat(100);
        let p = Hash::of(&data);
        // Two owners without a convergence secret still share ciphertext (dedup across
        // owners; confirmation-of-file possible).
        let a = Key::from_secrets([1; 32], None).seal(&p, &data, 3).unwrap();
        let b = Key::from_secrets([2; 32], None).seal(&p, &data, 3).unwrap();
        assert_eq!(a.name, b.name);
        assert_ne!(a.entry, b.entry, "the masked plaintext hash differs per owner");
        let c = key(Some(9)).seal(&p, &data, 3).unwrap();
        let d = key(Some(10)).seal(&p, &data, 3).unwrap();
        assert_ne!(c.name, d.name);
        assert_ne!(c.name, a.name);
        assert_eq!(c.name, key(Some(9)).seal(&p, &data, 3).unwrap().name);
        assert!(!c.ciphertext.windows(21).any(|w| w == b"the same block, twice"));
    }

    #[test]
    fn another_key_or_entry_fails_authentication() {
        let data = vec![5u8; 4096];
        let s = key(Some(1)).seal(&Hash::of(&data), &data, 3).unwrap();
        let (name, masked) = sealed_parts(&s);
        assert_eq!(key(Some(2)).open(&name, &masked, &s.ciphertext).unwrap_err().kind(), ErrorKind::Corrupt);
        let mut wrong = masked;
        wrong.0[0] ^= 1;
        assert_eq!(key(Some(1)).open(&name, &wrong, &s.ciphertext).unwrap_err().kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn declared_length_is_capped_before_allocating() {
        let data = vec![5u8; 4096];
        let k = key(None);
        let s = k.seal(&Hash::of(&data), &data, 3).unwrap();
        let (name, masked) = sealed_parts(&s);
        let mut c = s.ciphertext;
        c[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(k.open(&name, &masked, &c).unwrap_err().kind(), ErrorKind::TooLarge);
    }

    #[test]
    fn incompressible_max_block_fits_the_overhead() {
        let data: Vec<u8> = (0..MAX_BLOCK_SIZE).map(|i| (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes()[7]).collect();
        let s = key(None).seal(&Hash::of(&data), &data, 3).unwrap();
        assert!(s.ciphertext.len() <= MAX_BLOCK_SIZE + SEAL_OVERHEAD);
    }

    #[test]
    fn key_id_names_the_secret() {
        assert_eq!(key(None).id(), key(Some(3)).id());
        assert_ne!(Key::from_secrets([8; 32], None).id(), key(None).id());
        assert_eq!(key(None).id().to_string().len(), 16);
    }
}
