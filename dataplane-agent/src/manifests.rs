//! The manifests source: a directory of Kubernetes YAML (multi-document files included), watched by
//! polling, turned into apply/delete events for only the objects that changed.
//!
//! ```text
//!  DIR/*.yaml --stat--> changed files --parse--> objects per file --compare--> Apply / Delete
//!                                                                  '--> fingerprint of all files
//! ```
//!
//! A document that cannot be read is skipped with a warning naming it; when its kind and name can
//! still be read, the object it had before is kept, so a bad edit loses nothing.
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::SystemTime;

use dataplane_core::manifest::{is_manifest, parse_documents};
use dataplane_core::object::{Object, ObjectKey};
use dataplane_core::source::{Event, SourceWarning};

/// The result of a scan that found changes.
#[derive(Debug, Default)]
pub struct Scan {
    pub events: Vec<Event>,
    pub warnings: Vec<SourceWarning>,
    /// Fingerprint of every manifest file now in the directory (see
    /// [`dataplane_core::manifest::manifest_fingerprint`]).
    pub fingerprint: u64,
}

/// What is kept of a file: enough to tell what changed, not the objects themselves (the index holds
/// those), so a large manifest set is held in memory once.
#[derive(Debug)]
struct FileState {
    stamp: (SystemTime, u64, PathBuf),
    /// [`dataplane_core::manifest::content_digest`] of the whole file.
    digest: u64,
    /// Each object's digest (of its JSON form).
    objects: BTreeMap<ObjectKey, u64>,
}

/// Watches one directory.
#[derive(Debug)]
pub struct ManifestSource {
    dir: PathBuf,
    files: BTreeMap<String, FileState>,
    /// Which file an object comes from; a second file defining the same object is ignored for it.
    owners: HashMap<ObjectKey, String>,
    scanned_once: bool,
}

impl ManifestSource {
    #[must_use]
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            files: BTreeMap::new(),
            owners: HashMap::new(),
            scanned_once: false,
        }
    }

    /// Looks for changes. Returns `None` when nothing changed since the last scan.
    ///
    /// The directory path is resolved once per scan, so a directory swapped in atomically (a
    /// symlink replaced by rename, as Kubernetes does for ConfigMap volumes) is read as a whole.
    ///
    /// # Errors
    /// The directory cannot be listed.
    pub fn scan(&mut self) -> std::io::Result<Option<Scan>> {
        let dir = std::fs::canonicalize(&self.dir)?;
        let mut present = BTreeMap::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let path = entry.path();
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if meta.is_file() && is_manifest(&name) {
                let stamp = (meta.modified()?, meta.len(), path);
                present.insert(name, stamp);
            }
        }

        let mut scan = Scan::default();
        let mut changed = !self.scanned_once;
        self.scanned_once = true;
        let removed: Vec<String> = self
            .files
            .keys()
            .filter(|n| !present.contains_key(*n))
            .cloned()
            .collect();
        for name in removed {
            changed = true;
            if let Some(old) = self.files.remove(&name) {
                self.replace_objects(
                    &name,
                    &old.objects,
                    &BTreeMap::new(),
                    BTreeMap::new(),
                    &mut scan,
                );
            }
        }
        for (name, stamp) in present {
            if self.files.get(&name).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let content = match std::fs::read(&stamp.2) {
                Ok(c) => c,
                Err(e) => {
                    scan.warnings.push(SourceWarning::Unreadable {
                        file: name.clone(),
                        error: e.to_string(),
                    });
                    continue;
                }
            };
            let digest = dataplane_core::manifest::content_digest(&content);
            if let Some(f) = self.files.get_mut(&name)
                && f.digest == digest
            {
                f.stamp = stamp;
                continue;
            }
            changed = true;
            let old = self
                .files
                .remove(&name)
                .map(|f| f.objects)
                .unwrap_or_default();
            let mut digests = BTreeMap::new();
            let mut parsed = BTreeMap::new();
            for doc in parse_documents(&name, &content) {
                match doc {
                    Ok((obj, digest)) => {
                        let key = obj.key();
                        digests.insert(key.clone(), digest);
                        parsed.insert(key, obj);
                    }
                    Err(warning) => {
                        if let Some(key) = warning.object()
                            && let Some(previous) = old.get(key)
                        {
                            digests.insert(key.clone(), *previous);
                        }
                        scan.warnings.push(warning);
                    }
                }
            }
            self.replace_objects(&name, &old, &digests, parsed, &mut scan);
            self.files.insert(
                name,
                FileState {
                    stamp,
                    digest,
                    objects: digests,
                },
            );
        }
        if !changed {
            return Ok(None);
        }
        scan.fingerprint = dataplane_core::manifest::fingerprint_of_digests(
            self.files.iter().map(|(n, f)| (n.as_bytes(), f.digest)),
        );
        Ok(Some(scan))
    }

    /// Emits the events that turn a file's old objects into its new ones: `new` has the digest of
    /// every object the file now defines, `parsed` the objects read this time (an object kept from
    /// before because its new document is malformed has a digest but is not in `parsed`).
    fn replace_objects(
        &mut self,
        file: &str,
        old: &BTreeMap<ObjectKey, u64>,
        new: &BTreeMap<ObjectKey, u64>,
        mut parsed: BTreeMap<ObjectKey, Object>,
        scan: &mut Scan,
    ) {
        for key in old.keys() {
            if !new.contains_key(key) && self.owners.get(key).is_some_and(|o| o == file) {
                self.owners.remove(key);
                scan.events.push(Event::Delete(key.clone()));
            }
        }
        for (key, digest) in new {
            match self.owners.get(key) {
                Some(owner) if owner != file => {
                    scan.warnings.push(SourceWarning::Duplicate {
                        file: file.to_owned(),
                        key: key.clone(),
                        owner: owner.clone(),
                    });
                }
                _ => {
                    self.owners.insert(key.clone(), file.to_owned());
                    if old.get(key) != Some(digest)
                        && let Some(obj) = parsed.remove(key)
                    {
                        scan.events.push(Event::Apply(obj));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ns}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n";
    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: ns}\nspec: {nodeName: a, containers: []}\n";
    const DEPLOY: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n";

    fn keys(scan: &Scan) -> Vec<String> {
        scan.events
            .iter()
            .map(|e| match e {
                Event::Apply(o) => format!("apply {}", o.key()),
                Event::Delete(k) => format!("delete {k}"),
            })
            .collect()
    }

    fn write(dir: &Path, name: &str, content: &str) {
        // Rewrite through a new file, so the stamp (mtime, size, path) always changes.
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(tmp, dir.join(name)).unwrap();
    }

    #[test]
    fn multi_document_files_and_unknown_kinds() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.yaml",
            &format!("{SVC}---\n{POD}---\n{DEPLOY}---\n"),
        );
        write(dir.path(), "notes.txt", "not a manifest");
        let mut src = ManifestSource::new(dir.path().to_owned());
        let scan = src.scan().unwrap().unwrap();
        assert_eq!(keys(&scan), ["apply Service ns/web", "apply Pod ns/p"]);
        assert!(scan.warnings.is_empty());
        let content = std::fs::read(dir.path().join("a.yaml")).unwrap();
        assert_eq!(
            scan.fingerprint,
            dataplane_core::manifest::manifest_fingerprint([(&b"a.yaml"[..], content.as_slice())])
        );
        assert!(src.scan().unwrap().is_none(), "nothing changed");
    }

    #[test]
    fn only_changed_objects_become_events() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", &format!("{SVC}---\n{POD}"));
        let mut src = ManifestSource::new(dir.path().to_owned());
        src.scan().unwrap();
        write(
            dir.path(),
            "a.yaml",
            &format!("{}---\n{POD}", SVC.replace("port: 80", "port: 81")),
        );
        assert_eq!(
            keys(&src.scan().unwrap().unwrap()),
            ["apply Service ns/web"]
        );
        write(dir.path(), "a.yaml", POD);
        assert_eq!(
            keys(&src.scan().unwrap().unwrap()),
            ["delete Service ns/web"]
        );
        std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
        assert_eq!(keys(&src.scan().unwrap().unwrap()), ["delete Pod ns/p"]);
    }

    #[test]
    fn a_malformed_object_is_skipped_by_name_and_its_previous_version_kept() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", &format!("{SVC}---\n{POD}"));
        let mut src = ManifestSource::new(dir.path().to_owned());
        src.scan().unwrap();
        let broken = SVC.replace("ports: [{port: 80}]", "ports: banana");
        write(dir.path(), "a.yaml", &format!("{broken}---\n{POD}"));
        let scan = src.scan().unwrap().unwrap();
        assert!(
            scan.events.is_empty(),
            "no delete for the kept object: {:?}",
            keys(&scan)
        );
        assert_eq!(scan.warnings.len(), 1);
        assert!(
            scan.warnings[0].to_string().contains("a.yaml")
                && scan.warnings[0].to_string().contains("Service ns/web")
        );
        // Fixed again: the fix applies.
        write(
            dir.path(),
            "a.yaml",
            &format!("{}---\n{POD}", SVC.replace("port: 80", "port: 82")),
        );
        assert_eq!(
            keys(&src.scan().unwrap().unwrap()),
            ["apply Service ns/web"]
        );
    }

    #[test]
    fn invalid_yaml_and_nameless_objects_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "bad.yaml", "kind: [unclosed\n");
        write(
            dir.path(),
            "nameless.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {}\n",
        );
        write(dir.path(), "good.yaml", POD);
        let mut src = ManifestSource::new(dir.path().to_owned());
        let scan = src.scan().unwrap().unwrap();
        assert_eq!(keys(&scan), ["apply Pod ns/p"]);
        assert!(
            scan.warnings
                .iter()
                .map(ToString::to_string)
                .any(|w| w.starts_with("bad.yaml") && w.contains("not valid YAML"))
        );
        assert!(
            scan.warnings
                .iter()
                .map(ToString::to_string)
                .any(|w| w.starts_with("nameless.yaml") && w.contains("metadata.name"))
        );
    }

    #[test]
    fn the_same_object_in_two_files_stays_with_the_first() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", POD);
        write(dir.path(), "b.yaml", POD);
        let mut src = ManifestSource::new(dir.path().to_owned());
        let scan = src.scan().unwrap().unwrap();
        assert_eq!(keys(&scan), ["apply Pod ns/p"]);
        assert!(
            scan.warnings
                .iter()
                .map(ToString::to_string)
                .any(|w| w.contains("b.yaml") && w.contains("already defined in a.yaml"))
        );
    }
}
