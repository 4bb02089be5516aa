use proptest::prelude::*;
use serde_json::{json, Value};

use super::*;

const EXAMPLE: &str = r#"
apiVersion: muster/v1alpha1
kind: MachineConfig
hostname: node-a
files:
  - path: /etc/motd
    content: "hello\n"
    mode: "0644"
sysctls:
  net.ipv4.ip_forward: "1"
network:
  interfaces:
    - name: eth0
      addresses: ["192.168.5.20/24"]
      routes: [{to: "0.0.0.0/0", via: "192.168.5.1"}]
  nameservers: ["192.168.5.1"]
"#;

#[test]
fn the_issue_example_parses() {
    let (c, warnings) = parse(EXAMPLE).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(c.hostname.as_deref(), Some("node-a"));
    assert_eq!(c.files[0].mode.as_deref(), Some("0644"));
    assert_eq!(c.sysctls["net.ipv4.ip_forward"], "1");
    let net = c.network.as_ref().unwrap();
    assert_eq!(net.interfaces[0].routes[0].via.as_deref(), Some("192.168.5.1"));
    // Canonical YAML round-trips.
    let (again, _) = parse(&c.to_yaml().unwrap()).unwrap();
    assert_eq!(again, c);
}

#[test]
fn every_error_is_listed_with_its_path() {
    let bad = r#"
apiVersion: muster/v1alpha1
kind: MachineConfig
hostname: "-bad-"
files:
  - path: etc/motd
    content: x
    mode: "0999"
  - path: /etc/a
  - path: /proc/sys/x
    content: y
    owner: "Root"
sysctls:
  "net..x": "1"
network:
  interfaces:
    - name: eth0
      mac: "52:54:00:00:00:01"
    - mac: nope
      addresses: ["10.0.0.1", "10.0.0.1/33"]
      routes: [{to: "0.0.0.0/0", via: "fd00::1"}]
      mtu: 10
  nameservers: ["dns.example"]
users:
  - name: admin
    sshAuthorizedKeys: ["not a key"]
units:
  - name: k3s
"#;
    let err = parse(bad).unwrap_err();
    let got: Vec<String> = err.errors().iter().map(|e| e.path.clone()).collect();
    let want = [
        "hostname",
        "files[0].path",
        "files[0].mode",
        "files[1].content",
        "files[2].path",
        "files[2].owner",
        "sysctls.net..x",
        "network.interfaces[0]",
        "network.interfaces[1].mac",
        "network.interfaces[1].addresses[0]",
        "network.interfaces[1].addresses[1]",
        "network.interfaces[1].routes[0].via",
        "network.interfaces[1].mtu",
        "network.nameservers[0]",
        "users[0].sshAuthorizedKeys[0]",
        "units[0].name",
    ];
    assert_eq!(got, want, "{err}");
}

#[test]
fn structural_errors_name_their_path() {
    let table = [
        ("apiVersion: muster/v1alpha1\nkind: MachineConfig\nhostnme: x\n", "hostnme", "unknown field"),
        ("apiVersion: muster/v1alpha1\nkind: MachineConfig\nfiles:\n  - path: /a\n    contents: x\n", "files[0].contents", "unknown field"),
        ("apiVersion: muster/v1alpha1\nkind: MachineConfig\nfiles:\n  - path: /a\n    content: x\n    mode: 0644\n", "files[0].mode", "expected a string"),
        ("apiVersion: muster/v1alpha1\nkind: MachineConfig\nnetwork:\n  interfaces:\n    - name: eth0\n      mtu: big\n", "network.interfaces[0].mtu", "invalid"),
        ("apiVersion: muster/v1alpha1\nkind: Other\n", "kind", "MachineConfig"),
    ];
    for (doc, path, needle) in table {
        let err = parse(doc).unwrap_err();
        let e = &err.errors()[0];
        assert_eq!(e.path, path, "{doc}: {err}");
        assert!(e.message.contains(needle), "{doc}: {err}");
    }
    assert!(matches!(parse("a: [unclosed"), Err(ConfigError::Yaml(_))));
}

#[test]
fn yaml_11_booleans_stay_strings() {
    let doc = "apiVersion: muster/v1alpha1\nkind: MachineConfig\nfiles:\n  - path: /etc/answer\n    content: y\nsysctls:\n  net.ipv4.ip_forward: on\n";
    let (c, _) = parse(doc).unwrap();
    assert_eq!(c.files[0].content.as_deref(), Some("y"));
    assert_eq!(c.sysctls["net.ipv4.ip_forward"], "on");
}

#[test]
fn warnings_do_not_fail() {
    let doc = "apiVersion: muster/v1alpha1\nkind: MachineConfig\nhostname: Node-A\nfiles:\n  - path: /tmp/x\n    content: x\n    mode: \"0666\"\n";
    let (_, w) = parse(doc).unwrap();
    assert_eq!(w.len(), 2, "{w:?}");
}

#[test]
fn newtypes() {
    assert_eq!("0644".parse::<FileMode>().unwrap(), FileMode(0o644));
    assert_eq!("755".parse::<FileMode>().unwrap(), FileMode(0o755));
    assert!("0o644".parse::<FileMode>().is_err());
    let c: IpCidr = "fd00::1/64".parse().unwrap();
    assert_eq!(c.to_string(), "fd00::1/64");
    assert!("10.0.0.1/33".parse::<IpCidr>().is_err());
    assert_eq!("1000:1000".parse::<Owner>().unwrap().group.as_deref(), Some("1000"));
    assert!("a:b:c".parse::<Owner>().is_err());
    assert!("a.b-c.example".parse::<Hostname>().is_ok());
    assert!(format!("{}.x", "a".repeat(64)).parse::<Hostname>().is_err());
}

#[test]
fn layers_merge_by_rfc7386() {
    let table: Vec<(Value, Value, Value)> = vec![
        (json!({"a": 1}), json!({"a": 2}), json!({"a": 2})),
        (json!({"a": 1}), json!({"b": 2}), json!({"a": 1, "b": 2})),
        (json!({"a": 1, "b": 2}), json!({"a": null}), json!({"b": 2})),
        (json!({"a": [1, 2]}), json!({"a": [3]}), json!({"a": [3]})),
        (json!({"a": {"b": 1, "c": 2}}), json!({"a": {"b": null, "d": 3}}), json!({"a": {"c": 2, "d": 3}})),
        (json!({"a": 1}), json!({"a": {"b": 1}}), json!({"a": {"b": 1}})),
        (json!({"a": {"b": 1}}), json!({"a": 5}), json!({"a": 5})),
        (json!([1]), json!({"a": 1}), json!({"a": 1})),
    ];
    for (mut target, patch, want) in table {
        merge_patch(&mut target, &patch);
        assert_eq!(target, want);
    }
}

#[test]
fn named_lists_merge_by_their_key_and_patch_delete_removes() {
    let cluster = json!({
        "files": [{"path": "/etc/a", "content": "a\n"}, {"path": "/etc/b", "content": "b\n", "mode": "0644"}],
        "users": [{"name": "ops", "groups": ["sudo"]}],
        "kernelModules": [{"name": "br_netfilter"}],
        "network": {"interfaces": [{"name": "eth0", "mtu": 9000, "vlans": [{"id": 10, "dhcp": true}]}]},
    });
    let machine = json!({
        "files": [{"path": "/etc/b", "mode": "0600"}, {"path": "/etc/c", "content": "c\n"}, {"path": "/etc/a", "$patch": "delete"}],
        "users": [{"name": "dev"}],
        "network": {"interfaces": [{"name": "eth0", "addresses": ["10.0.0.5/24"], "vlans": [{"id": 20, "dhcp": true}]}]},
    });
    let (c, _) = render(&[("cluster", &cluster), ("machine", &machine)]).unwrap();
    let files: Vec<(&str, Option<&str>, Option<&str>)> =
        c.files.iter().map(|f| (f.path.as_str(), f.content.as_deref(), f.mode.as_deref())).collect();
    assert_eq!(
        files,
        [("/etc/b", Some("b\n"), Some("0600")), ("/etc/c", Some("c\n"), None)],
        "b merged (its content kept, its mode overridden), c added, a deleted"
    );
    let users: Vec<&str> = c.users.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(users, ["ops", "dev"], "the cluster's user is not dropped by the machine's");
    assert_eq!(c.kernel_modules.len(), 1);
    let eth0 = &c.network.as_ref().unwrap().interfaces[0];
    assert_eq!((eth0.mtu, eth0.addresses.clone()), (Some(9000), vec!["10.0.0.5/24".to_string()]));
    let vlans: Vec<u16> = eth0.vlans.iter().map(|v| v.id).collect();
    assert_eq!(vlans, [10, 20]);
    // Lists that are not named things still replace (RFC 7386).
    let (c, _) =
        render(&[("a", &json!({"timeServers": ["a"]})), ("b", &json!({"timeServers": ["b"]}))]).unwrap();
    assert_eq!(c.time_servers, ["b"]);
}

#[test]
fn render_applies_cluster_then_role_then_machine() {
    let cluster = json!({"sysctls": {"net.ipv4.ip_forward": "1", "vm.swappiness": "10"}, "timeServers": ["pool.ntp.org"]});
    let role =
        json!({"files": [{"path": "/etc/role", "content": "worker\n"}], "sysctls": {"vm.swappiness": "1"}});
    let machine = json!({"hostname": "node-a", "sysctls": {"net.ipv4.ip_forward": null}});
    let (c, _) = render(&[("cluster", &cluster), ("role", &role), ("machine", &machine)]).unwrap();
    assert_eq!(c.hostname.as_deref(), Some("node-a"));
    assert_eq!(c.sysctls.len(), 1);
    assert_eq!(c.sysctls["vm.swappiness"], "1");
    assert_eq!(c.files[0].path, "/etc/role");
    assert_eq!(c.time_servers, ["pool.ntp.org"]);
    let bad = json!({"hostname": "-x"});
    let e = render(&[("machine", &bad)]).unwrap_err();
    assert_eq!(e.source.errors()[0].path, "hostname");
    assert!(render(&[("role", &json!([1]))]).is_err());
}

#[test]
fn schema_describes_the_model() {
    let s = json_schema();
    let text = s.to_string();
    for field in
        ["apiVersion", "hostname", "files", "sysctls", "network", "contentBase64", "sshAuthorizedKeys"]
    {
        assert!(text.contains(field), "{field} missing from the schema");
    }
    assert_eq!(s["additionalProperties"], json!(false));
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i32>().prop_map(Value::from),
        "[a-z]{0,6}".prop_map(Value::from)
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-c]", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn config_layer() -> impl Strategy<Value = Value> {
    (
        prop::option::of("[a-z][a-z0-9]{0,8}"),
        prop::collection::btree_map("(net|vm)\\.[a-z_]{1,6}", prop::option::of("[0-9]{1,3}"), 0..4),
        prop::collection::vec("/etc/[a-z]{1,6}", 0..3),
    )
        .prop_map(|(host, sysctls, files)| {
            let mut v = json!({});
            if let Some(h) = host {
                v["hostname"] = Value::from(h);
            }
            v["sysctls"] = Value::Object(
                sysctls.into_iter().map(|(k, x)| (k, x.map_or(Value::Null, Value::from))).collect(),
            );
            let mut seen = std::collections::BTreeSet::new();
            let files: Vec<Value> = files
                .into_iter()
                .filter(|p| seen.insert(p.clone()))
                .map(|p| json!({"path": p, "content": "x"}))
                .collect();
            v["files"] = Value::from(files);
            v
        })
}

proptest! {
    #[test]
    fn merge_patch_is_idempotent(target in json_value(), patch in json_value()) {
        let mut once = target.clone();
        merge_patch(&mut once, &patch);
        let mut twice = once.clone();
        merge_patch(&mut twice, &patch);
        prop_assert_eq!(once, twice);
    }

    #[test]
    fn render_is_deterministic_and_idempotent(a in config_layer(), b in config_layer(), c in config_layer()) {
        let layers = [("cluster", &a), ("role", &b), ("machine", &c)];
        let first = render(&layers);
        let second = render(&layers);
        prop_assert_eq!(&first, &second);
        if let Ok((cfg, _)) = first {
            // Rendering the rendered config again, as a single layer, changes nothing.
            let as_value = serde_json::to_value(&cfg).unwrap();
            let (again, _) = render(&[("machine", &as_value)]).unwrap();
            prop_assert_eq!(&again, &cfg);
            prop_assert_eq!(again.to_yaml().unwrap(), cfg.to_yaml().unwrap());
        }
    }
}
