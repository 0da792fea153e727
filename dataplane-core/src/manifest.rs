//! Manifest files and the fingerprints that tell a caller when an agent programmed exactly them.

/// Whether a file of a manifests directory is read (by the agent, and by the lab building from
/// the same directory): YAML or JSON, not hidden.
#[must_use]
pub fn is_manifest(name: &str) -> bool {
    !name.starts_with('.')
        && std::path::Path::new(name)
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a (64 bit) of `bytes`, length-prefixed, continuing from `h`.
fn fnv_feed(mut h: u64, bytes: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    for b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(PRIME);
    }
    h
}

/// Digest of one file's (or one document's) bytes: FNV-1a, 64 bit.
#[must_use]
pub fn content_digest(content: &[u8]) -> u64 {
    fnv_feed(FNV_OFFSET, content)
}

/// Fingerprint of a set of manifest files, so a caller can tell when the agent has programmed
/// exactly the files it wrote. Files must be given sorted by name; names are length-prefixed, so no
/// two different sets collide by concatenation.
#[must_use]
pub fn manifest_fingerprint<'a>(files: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> u64 {
    fingerprint_of_digests(
        files
            .into_iter()
            .map(|(name, content)| (name, content_digest(content))),
    )
}

/// [`manifest_fingerprint`] from each file's [`content_digest`], for a caller that keeps only those.
#[must_use]
pub fn fingerprint_of_digests<'a>(files: impl IntoIterator<Item = (&'a [u8], u64)>) -> u64 {
    files.into_iter().fold(FNV_OFFSET, |h, (name, digest)| {
        fnv_feed(fnv_feed(h, name), &digest.to_le_bytes())
    })
}

/// Contribution of one object version to a Kubernetes source's digest: the XOR of this over every
/// object held equals the XOR over a list of the same objects at the same resource versions, so a
/// caller that listed them can tell when the agent caught up. Cluster-scoped objects have an empty
/// namespace.
#[must_use]
pub fn object_digest(kind: &str, namespace: &str, name: &str, resource_version: &str) -> u64 {
    manifest_fingerprint([
        (kind.as_bytes(), namespace.as_bytes()),
        (name.as_bytes(), resource_version.as_bytes()),
    ])
}
