//! `kubenet image pull`: the lab's base images, downloaded from the groups' `image_url` and
//! verified before they are used. The expected SHA-256 is the group's `image_sha256`, else the
//! publisher's `SHA256SUMS` beside the image (as Ubuntu and Debian publish them). The download
//! goes to a hidden `.part` file beside the image, hashed as it arrives, and is renamed into
//! place only when the hash matches, so a failed or tampered download changes nothing. A
//! download cut short keeps its `.part` (stamped with the hash it is meant to reach) and the
//! next pull asks for the rest with an HTTP range request, as `curl -C -` and `wget -c` do.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use kubenet_cluster::{Arch, Lab};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "no download address for {path} (used by {vms}): the group names its own image, so put the file there, or give the group an `image_url`"
    )]
    NoUrl { path: PathBuf, vms: String },
    #[error("{0}")]
    Select(String),
    #[error("{url}: {message}")]
    Http { url: String, message: String },
    #[error("{sums_url} lists no SHA-256 for {file}: set the group's `image_sha256` to check it another way")]
    NotListed { sums_url: String, file: String },
    #[error(
        "cannot check {url} (the image of {vms}): its publisher's checksums at {sums_url} cannot be read ({message}); set the group's `image_sha256` to the image's SHA-256 to check it without them"
    )]
    NoSums { url: String, vms: String, sums_url: String, message: String },
    #[error(
        "{url}: SHA-256 {got} does not match the expected {want} (from {from}); the download was discarded and {path} left as it was"
    )]
    Mismatch { url: String, got: String, want: String, from: String, path: PathBuf },
    #[error(
        "{url}: {message}; the first {kept} bytes are kept in {part}: `kubenet image pull` again resumes from there"
    )]
    Interrupted { url: String, message: String, kept: u64, part: PathBuf },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// One base image to fetch: where it goes, where it comes from, how it is checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pull {
    pub path: PathBuf,
    pub url: String,
    /// A fixed hash (the group's `image_sha256`), or None: the SHA256SUMS file at `sums_url`.
    pub sha256: Option<String>,
    pub sums_url: String,
    /// The VMs that use it, for messages.
    pub vms: Vec<String>,
}

/// The SHA256SUMS file beside `url`.
pub fn sums_url(url: &str) -> String {
    match url.rsplit_once('/') {
        Some((dir, _)) => format!("{dir}/SHA256SUMS"),
        None => "SHA256SUMS".into(),
    }
}

/// The last path segment of `url` (without a query).
pub fn file_name(url: &str) -> &str {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    path.rsplit('/').next().unwrap_or(path)
}

/// The images of `vms` (every VM of the lab when empty) on a host of architecture `host`, one
/// per distinct path, in lab order: each VM's `{arch}` is its own architecture, so a lab of
/// amd64 and arm64 guests pulls both images.
pub fn plan(lab: &Lab, names: &[String], host: Arch) -> Result<Vec<Pull>, ImageError> {
    let vms = lab.select(names).map_err(ImageError::Select)?;
    let mut pulls: Vec<Pull> = Vec::new();
    for vm in vms {
        let path = crate::files::base_image(lab, vm, host);
        if let Some(p) = pulls.iter_mut().find(|p| p.path == path) {
            p.vms.push(vm.name.clone());
            continue;
        }
        let users = || {
            let same = |v: &&kubenet_cluster::Vm| crate::files::base_image(lab, v, host) == path;
            lab.vms.iter().filter(same).map(|v| v.name.as_str()).collect::<Vec<_>>()
        };
        let Some(url) = vm.image_url_for(host) else {
            let vms = users().join(", ");
            return Err(ImageError::NoUrl { path, vms });
        };
        pulls.push(Pull {
            path,
            sums_url: sums_url(&url),
            url,
            sha256: vm.image_sha256.clone(),
            vms: vec![vm.name.clone()],
        });
    }
    Ok(pulls)
}

/// The hash `sums` (a SHA256SUMS file: "HEX *NAME" or "HEX  NAME" per line) gives for `file`.
pub fn find_sum(sums: &str, file: &str) -> Option<String> {
    sums.lines().find_map(|line| {
        let (hash, name) = line.trim().split_once(char::is_whitespace)?;
        let name = name.trim_start();
        let name = name.strip_prefix('*').unwrap_or(name);
        (name == file && hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| hash.to_ascii_lowercase())
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of the file at `path`.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut h = Sha256::new();
    hash_file(path, &mut h)?;
    Ok(hex(&h.finalize()))
}

/// Feeds the file at `path` to `h`; returns its length.
fn hash_file(path: &Path, h: &mut Sha256) -> std::io::Result<u64> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0;
    loop {
        match f.read(&mut buf)? {
            0 => return Ok(len),
            n => {
                h.update(&buf[..n]);
                len += n as u64;
            }
        }
    }
}

type Response = ureq::http::Response<ureq::Body>;

fn get(url: &str) -> Result<Response, ImageError> {
    ureq::get(url).call().map_err(|e| ImageError::Http { url: url.into(), message: e.to_string() })
}

/// How a server answered a request for the bytes from an offset on (RFC 9110 §14.2).
enum Ranged {
    /// 206, the rest from that offset; the whole size if the `Content-Range` gives it.
    Rest(Response, Option<u64>),
    /// 200: the server ignored the range and sends the whole file.
    Whole(Response),
    /// 416, or a 206 for other bytes than asked: start over.
    Unusable,
}

fn get_from(url: &str, from: u64) -> Result<Ranged, ImageError> {
    let response = match ureq::get(url).header("Range", format!("bytes={from}-")).call() {
        Err(ureq::Error::StatusCode(416)) => return Ok(Ranged::Unusable),
        r => r.map_err(|e| ImageError::Http { url: url.into(), message: e.to_string() })?,
    };
    if response.status() != 206 {
        return Ok(Ranged::Whole(response));
    }
    let range = response.headers().get("content-range").and_then(|v| v.to_str().ok()).unwrap_or("");
    Ok(match parse_content_range(range) {
        Some((start, total)) if start == from => Ranged::Rest(response, total),
        _ => Ranged::Unusable,
    })
}

/// "bytes 100-999/1000" -> (100, Some(1000)); "bytes 100-999/*" -> (100, None).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let (range, total) = v.trim().strip_prefix("bytes ")?.split_once('/')?;
    let start = range.split_once('-')?.0.trim().parse().ok()?;
    let total = if total.trim() == "*" { None } else { Some(total.trim().parse().ok()?) };
    Some((start, total))
}

/// What [`pull`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Pulled {
    /// The file was there with the expected hash.
    UpToDate,
    /// Downloaded and verified: the image's size, and where this pull took up an earlier
    /// one's partial download (0: from the start).
    Downloaded { bytes: u64, resumed_at: u64 },
}

/// The expected hash of `p`'s image, and where it came from.
pub fn expected(p: &Pull) -> Result<(String, String), ImageError> {
    if let Some(h) = &p.sha256 {
        return Ok((h.clone(), "the group's image_sha256".into()));
    }
    let unreadable = |message: String| ImageError::NoSums {
        url: p.url.clone(),
        vms: p.vms.join(", "),
        sums_url: p.sums_url.clone(),
        message,
    };
    let sums = get(&p.sums_url)
        .map_err(|e| match e {
            ImageError::Http { message, .. } => unreadable(message),
            other => other,
        })?
        .body_mut()
        .read_to_string()
        .map_err(|e| unreadable(e.to_string()))?;
    let file = file_name(&p.url);
    find_sum(&sums, file)
        .map(|h| (h, p.sums_url.clone()))
        .ok_or_else(|| ImageError::NotListed { sums_url: p.sums_url.clone(), file: file.into() })
}

/// Where `pull` records the hash it verified an image against: `IMAGE.sha256`, in
/// sha256sum's format, so `kubenet doctor` (and `sha256sum -c`) can check the image later
/// without the network.
pub fn sum_file(image: &Path) -> PathBuf {
    let mut name = image.file_name().unwrap_or_default().to_os_string();
    name.push(".sha256");
    image.with_file_name(name)
}

fn record_sum(image: &Path, sha256: &str) -> std::io::Result<()> {
    let name = image.file_name().map_or("image".into(), |n| n.to_string_lossy().into_owned());
    kubenet_cluster::state::write_atomic(&sum_file(image), format!("{sha256}  {name}\n").as_bytes(), 0o644)
}

/// The hash recorded by an earlier pull of `image`, if any.
pub fn recorded_sum(image: &Path) -> Option<String> {
    let text = std::fs::read_to_string(sum_file(image)).ok()?;
    let name = image.file_name()?.to_string_lossy().into_owned();
    find_sum(&text, &name)
}

/// Makes sure `p.path` holds the image with the expected hash: kept if it does, else
/// downloaded (reporting `(bytes so far, total if known)` to `progress`), verified, and renamed
/// into place.
pub fn pull(p: &Pull, mut progress: impl FnMut(u64, Option<u64>)) -> Result<Pulled, ImageError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImageError::Io { path, source }
    };
    let (want, from) = expected(p)?;
    if p.path.is_file() && file_sha256(&p.path).map_err(io(&p.path))? == want {
        record_sum(&p.path, &want).map_err(io(&sum_file(&p.path)))?;
        return Ok(Pulled::UpToDate);
    }
    let dir = p.path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let name = p.path.file_name().map_or("image".into(), |n| n.to_string_lossy().into_owned());
    let part = dir.join(format!(".{name}.part"));
    // The hash the partial download is meant to reach: a part made for another image (the
    // publisher's "current" moved on) is not resumed.
    let stamp = dir.join(format!(".{name}.part.sha256"));
    let mut h = Sha256::new();
    let mut have = 0;
    if part.is_file() && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == want) {
        have = hash_file(&part, &mut h).map_err(io(&part))?;
    } else {
        let _ = std::fs::remove_file(&part);
    }
    let answer = if have > 0 { get_from(&p.url, have)? } else { Ranged::Unusable };
    let (mut response, total, mut out, resumed_at) = match answer {
        Ranged::Rest(r, total) => {
            let total = total.or_else(|| r.body().content_length().map(|n| n + have));
            let out = std::fs::OpenOptions::new().append(true).open(&part).map_err(io(&part))?;
            (r, total, out, have)
        }
        whole_or_not => {
            h = Sha256::new();
            let r = match whole_or_not {
                Ranged::Whole(r) => r,
                _ => get(&p.url)?,
            };
            let total = r.body().content_length();
            std::fs::write(&stamp, format!("{want}\n")).map_err(io(&stamp))?;
            (r, total, std::fs::File::create(&part).map_err(io(&part))?, 0)
        }
    };
    let mut body = response.body_mut().with_config().limit(u64::MAX).reader();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = resumed_at;
    progress(done, total);
    loop {
        let n = match body.read(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                let _ = out.sync_all();
                return Err(ImageError::Interrupted { url: p.url.clone(), message: e.to_string(), kept: done, part });
            }
        };
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io(&part))?;
        done += n as u64;
        progress(done, total);
    }
    out.sync_all().map_err(io(&part))?;
    let got = hex(&h.finalize());
    if got != want {
        let _ = std::fs::remove_file(&part);
        let _ = std::fs::remove_file(&stamp);
        return Err(ImageError::Mismatch { url: p.url.clone(), got, want, from, path: p.path.clone() });
    }
    std::fs::rename(&part, &p.path).map_err(io(&p.path))?;
    let _ = std::fs::remove_file(&stamp);
    record_sum(&p.path, &want).map_err(io(&sum_file(&p.path)))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(Pulled::Downloaded { bytes: done, resumed_at })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_expand_and_name_their_sums() {
        let url = kubenet_cluster::IMAGE_URL.replace("{arch}", "arm64");
        assert_eq!(url, "https://cloud-images.ubuntu.com/noble/current/noble-server-cloudimg-arm64.img");
        assert_eq!(sums_url(&url), "https://cloud-images.ubuntu.com/noble/current/SHA256SUMS");
        assert_eq!(file_name(&url), "noble-server-cloudimg-arm64.img");
        assert_eq!(file_name("http://h/a/b.img?x=1"), "b.img");
    }

    #[test]
    fn content_ranges_are_read() {
        assert_eq!(parse_content_range("bytes 100-999/1000"), Some((100, Some(1000))));
        assert_eq!(parse_content_range("bytes 0-0/*"), Some((0, None)));
        assert_eq!(parse_content_range("bytes */1000"), None, "the 416 form names no start");
        assert_eq!(parse_content_range("items 1-2/3"), None);
        assert_eq!(parse_content_range(""), None);
    }

    #[test]
    fn sums_files_in_both_layouts() {
        let a = "a".repeat(64);
        let b = "B".repeat(64);
        let sums = format!("{a} *noble-server-cloudimg-amd64.img\n{b}  noble-server-cloudimg-arm64.img\nbad line\n");
        assert_eq!(find_sum(&sums, "noble-server-cloudimg-amd64.img"), Some(a));
        assert_eq!(find_sum(&sums, "noble-server-cloudimg-arm64.img"), Some("b".repeat(64)));
        assert_eq!(find_sum(&sums, "noble-server-cloudimg-amd64"), None);
        assert_eq!(find_sum("xyz *f\n", "f"), None, "not a hash");
    }

    #[test]
    fn the_plan_groups_vms_by_image_and_needs_a_url_for_custom_images() {
        let mut lab = kubenet_cluster::parse(
            kubenet_cluster::REFERENCE_CONFIG,
            kubenet_cluster::Source::Embedded,
            Path::new("/lab"),
        )
        .unwrap();
        let plan = plan(&lab, &[], Arch::X86_64).unwrap();
        assert_eq!(plan.len(), 1, "all seven share the default image");
        assert_eq!(plan[0].path, Path::new("/lab/images/ubuntu-24.04-server-cloudimg-amd64.img"));
        assert_eq!(plan[0].url, "https://cloud-images.ubuntu.com/noble/current/noble-server-cloudimg-amd64.img");
        assert_eq!(plan[0].vms.len(), 7);
        assert_eq!(plan[0].sha256, None);

        lab.vms[0].image = "mine.img".into();
        lab.vms[0].image_url = None;
        let err = super::plan(&lab, &[], Arch::X86_64).unwrap_err().to_string();
        assert!(err.contains("/lab/mine.img (used by gateway)") && err.contains("image_url"), "{err}");
        assert_eq!(super::plan(&lab, &["worker0".into()], Arch::X86_64).unwrap().len(), 1, "only what was asked");
    }

    #[test]
    fn a_mixed_lab_pulls_each_guest_architecture_once() {
        let lab = crate::qemu::tests::lab_with_workers("aarch64");
        let url = |a: &str| format!("https://cloud-images.ubuntu.com/noble/current/noble-server-cloudimg-{a}.img");
        // On an x86 host: the gateway and controls are amd64 (auto), the workers arm64.
        let plan = plan(&lab, &[], Arch::X86_64).unwrap();
        assert_eq!(plan.len(), 2, "{plan:?}");
        assert_eq!(plan[0].path, Path::new("/lab/images/ubuntu-24.04-server-cloudimg-amd64.img"));
        assert_eq!((plan[0].url.clone(), plan[0].vms.len()), (url("amd64"), 4));
        assert_eq!(plan[1].path, Path::new("/lab/images/ubuntu-24.04-server-cloudimg-arm64.img"));
        assert_eq!(
            (plan[1].url.clone(), plan[1].vms.clone()),
            (url("arm64"), vec!["worker0".into(), "worker1".into(), "worker2".into()])
        );
        assert_eq!(plan[1].sums_url, "https://cloud-images.ubuntu.com/noble/current/SHA256SUMS");
        // On an Apple Silicon Mac every guest is arm64: one image.
        let plan = super::plan(&lab, &[], Arch::Aarch64).unwrap();
        assert_eq!((plan.len(), plan[0].url.clone(), plan[0].vms.len()), (1, url("arm64"), 7));
    }
}
