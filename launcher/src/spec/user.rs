//! The user a container is for, and the passwd/group files that show them inside.

use std::path::PathBuf;

use nix::unistd::{Gid, Group, Uid, User};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserInfo {
    pub uid: u32,
    pub gid: u32,
    pub name: String,
    pub home: PathBuf,
    pub shell: PathBuf,
    /// Supplementary groups as (gid, name); they appear as `nogroup` inside because an
    /// unprivileged user namespace maps only the user's own group.
    pub groups: Vec<(u32, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("uid {0} has no passwd entry on this host: ferry needs the user's name and home")]
    NoPasswdEntry(u32),
    #[error("cannot read the passwd entry of uid {uid}: {source}")]
    Lookup { uid: u32, source: nix::Error },
}

impl UserInfo {
    /// The user with `uid`/`gid` and supplementary `groups`, as the host's passwd knows them.
    pub fn lookup(uid: u32, gid: u32, groups: &[u32]) -> Result<UserInfo, UserError> {
        let user = User::from_uid(Uid::from_raw(uid))
            .map_err(|source| UserError::Lookup { uid, source })?
            .ok_or(UserError::NoPasswdEntry(uid))?;
        let groups = groups
            .iter()
            .filter(|g| **g != gid)
            .map(|g| {
                let name = Group::from_gid(Gid::from_raw(*g))
                    .ok()
                    .flatten()
                    .map(|gr| gr.name)
                    .unwrap_or_else(|| g.to_string());
                (*g, name)
            })
            .collect();
        Ok(UserInfo {
            uid,
            gid,
            name: user.name,
            home: user.dir,
            shell: user.shell,
            groups,
        })
    }

    /// The calling process's user.
    pub fn current() -> Result<UserInfo, UserError> {
        let groups: Vec<u32> = nix::unistd::getgroups()
            .unwrap_or_default()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        UserInfo::lookup(Uid::current().as_raw(), Gid::current().as_raw(), &groups)
    }

    /// The name of the user's primary group (falls back to the user name, as most sites
    /// give every user a group of their own).
    pub fn group_name(&self) -> String {
        Group::from_gid(Gid::from_raw(self.gid))
            .ok()
            .flatten()
            .map(|g| g.name)
            .unwrap_or_else(|| self.name.clone())
    }
}

/// The ids a user has inside the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InsideIds {
    pub uid: u32,
    pub gid: u32,
}

/// Whether a passwd or group file has an entry `root` with id 0 (`root:x:0:…`).
pub fn names_id_0(text: &str) -> bool {
    text.lines().any(|line| {
        let mut fields = line.split(':');
        fields.next() == Some("root") && fields.nth(1) == Some("0")
    })
}

/// The image's passwd file with the container user's entry (home directory `home`) put in
/// place of any entry with the same uid or name. Lines the parser does not understand are
/// kept as they are.
pub fn passwd_with_user(
    image_passwd: &str,
    user: &UserInfo,
    inside: InsideIds,
    home: &std::path::Path,
    shell: &str,
) -> String {
    let home = home.display().to_string();
    let name = if inside.uid == 0 {
        "root".to_string()
    } else {
        user.name.clone()
    };
    let mut out = String::new();
    for line in image_passwd.lines() {
        let mut fields = line.split(':');
        let entry_name = fields.next().unwrap_or("");
        let entry_uid = fields.nth(1).and_then(|u| u.parse::<u32>().ok());
        if entry_name == name || entry_uid == Some(inside.uid) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(&format!(
        "{name}:x:{}:{}:{name}:{home}:{shell}\n",
        inside.uid, inside.gid
    ));
    out
}

/// The image's group file with the user's primary group (and `nogroup`, which unmapped
/// supplementary groups show as) present.
pub fn group_with_user(
    image_group: &str,
    group_name: &str,
    user_name: &str,
    inside: InsideIds,
) -> String {
    let group_name = if inside.gid == 0 { "root" } else { group_name };
    let mut out = String::new();
    let mut have_nogroup = false;
    for line in image_group.lines() {
        let mut fields = line.split(':');
        let entry_name = fields.next().unwrap_or("");
        let entry_gid = fields.nth(1).and_then(|g| g.parse::<u32>().ok());
        if entry_name == group_name || entry_gid == Some(inside.gid) {
            continue;
        }
        have_nogroup |= entry_gid == Some(65534);
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(&format!("{group_name}:x:{}:{user_name}\n", inside.gid));
    if !have_nogroup {
        out.push_str("nogroup:x:65534:\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> UserInfo {
        UserInfo {
            uid: 1000,
            gid: 1000,
            name: "alice".into(),
            home: "/home/alice".into(),
            shell: "/bin/bash".into(),
            groups: vec![],
        }
    }

    #[test]
    fn passwd_replaces_same_uid_and_keeps_others() {
        let image =
            "root:x:0:0:root:/root:/bin/sh\nubuntu:x:1000:1000::/home/ubuntu:/bin/sh\ngarbage\n";
        let out = passwd_with_user(
            image,
            &alice(),
            InsideIds {
                uid: 1000,
                gid: 1000,
            },
            &alice().home,
            "/bin/bash",
        );
        assert!(out.contains("root:x:0:0:root:/root:/bin/sh\n"));
        assert!(!out.contains("ubuntu"));
        assert!(out.contains("garbage\n"));
        assert!(out.ends_with("alice:x:1000:1000:alice:/home/alice:/bin/bash\n"));
    }

    #[test]
    fn root_entries_are_found_in_passwd_and_group() {
        assert!(names_id_0(
            "daemon:x:1:1::/:/bin/sh\nroot:x:0:0:root:/root:/bin/bash\n"
        ));
        assert!(names_id_0("root:x:0:\n"));
        assert!(!names_id_0("root:x:1:1\ntoor:x:0:0\n"));
        assert!(!names_id_0(""));
    }

    #[test]
    fn remapped_root_is_named_root() {
        let out = passwd_with_user(
            "root:x:0:0:root:/root:/bin/sh\n",
            &alice(),
            InsideIds { uid: 0, gid: 0 },
            std::path::Path::new("/root"),
            "/bin/sh",
        );
        assert_eq!(out, "root:x:0:0:root:/root:/bin/sh\n");
    }

    #[test]
    fn group_has_primary_and_nogroup() {
        let out = group_with_user(
            "root:x:0:\nusers:x:100:\n",
            "alice",
            "alice",
            InsideIds {
                uid: 1000,
                gid: 1000,
            },
        );
        assert!(out.contains("alice:x:1000:alice\n"));
        assert!(out.contains("nogroup:x:65534:\n"));
        assert!(out.contains("users:x:100:\n"));
    }
}
