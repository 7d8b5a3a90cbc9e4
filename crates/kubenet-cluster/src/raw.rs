//! The config file exactly as written: serde structs that mirror the TOML, with spans kept on
//! every value that validation may complain about. Nothing here is checked beyond types; see
//! `resolve` for the rules. Pure.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLab {
    pub state_dir: Option<Spanned<String>>,
    pub accelerator: Option<Spanned<crate::Accelerator>>,
    pub firmware: Option<Spanned<crate::FirmwareChoice>>,
    #[serde(default)]
    pub network: RawNetwork,
    #[serde(default)]
    pub dns: RawDns,
    #[serde(default)]
    pub login: RawLogin,
    #[serde(default, rename = "group")]
    pub groups: Vec<Spanned<RawGroup>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNetwork {
    pub subnet: Option<Spanned<String>>,
    pub host_name: Option<Spanned<String>>,
    pub host_address: Option<Spanned<Ipv4Addr>>,
    pub dhcp_range: Option<Spanned<(Ipv4Addr, Ipv4Addr)>>,
    pub lease_time: Option<Spanned<String>>,
    pub domain: Option<Spanned<String>>,
    pub ip_offset: Option<Spanned<u32>>,
    pub mac_prefix: Option<Spanned<String>>,
    pub upstream: Option<Vec<Spanned<String>>>,
    pub bridge: Option<Spanned<String>>,
    pub nat: Option<bool>,
    pub dhcp_relays: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub hosts: BTreeMap<String, Spanned<Ipv4Addr>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    pub local_ttl: Option<u32>,
    pub allow: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLogin {
    pub user: Option<Spanned<String>>,
    pub password: Option<String>,
    pub ssh_public_key: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGroup {
    pub name: Option<Spanned<String>>,
    pub prefix: Option<Spanned<String>>,
    pub count: Option<Spanned<u32>>,
    pub role: Option<Spanned<String>>,
    pub vcpus: Option<Spanned<u32>>,
    pub memory: Option<Spanned<String>>,
    pub disk: Option<Spanned<String>>,
    pub arch: Option<Spanned<String>>,
    pub image: Option<String>,
    pub image_url: Option<Spanned<String>>,
    pub image_sha256: Option<Spanned<String>>,
    pub user_data: Option<Spanned<String>>,
    pub network_config: Option<Spanned<String>>,
    pub address: Option<Spanned<Ipv4Addr>>,
    #[serde(default)]
    pub addresses: BTreeMap<String, Spanned<Ipv4Addr>>,
}
