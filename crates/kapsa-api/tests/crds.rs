//! Checks on the generated CRDs: names, printer columns, subresources,
//! descriptions on every property, CEL cost guards, and agreement between
//! the schema defaults (applied by the API server) and the serde defaults
//! (applied by the Rust types).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use kapsa_api::naming::{MAX_BASE_DOMAIN_LEN, MAX_ENVIRONMENT_NAME_LEN, MAX_PROJECT_NAME_LEN};
use kapsa_api::{DomainPool, Project, crds, crds_yaml};
use serde_json::{Value, json};

fn crd(kind: &str) -> CustomResourceDefinition {
    crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for {kind}"))
}

fn root_schema(crd: &CustomResourceDefinition) -> &JSONSchemaProps {
    crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("openAPIV3Schema")
}

/// The schema at a dotted property path, e.g. `spec.source.pollInterval`.
fn at<'a>(schema: &'a JSONSchemaProps, path: &str) -> &'a JSONSchemaProps {
    path.split('.').fold(schema, |s, key| {
        s.properties
            .as_ref()
            .and_then(|p| p.get(key))
            .unwrap_or_else(|| panic!("no property {key} in path {path}"))
    })
}

fn children(schema: &JSONSchemaProps) -> Vec<(String, &JSONSchemaProps)> {
    let mut out = Vec::new();
    if let Some(props) = &schema.properties {
        out.extend(props.iter().map(|(k, v)| (k.clone(), v)));
    }
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = &schema.items {
        out.push(("[]".to_owned(), items.as_ref()));
    }
    if let Some(JSONSchemaPropsOrBool::Schema(values)) = &schema.additional_properties {
        out.push(("{}".to_owned(), values.as_ref()));
    }
    out
}

fn walk<'a>(
    schema: &'a JSONSchemaProps,
    path: &str,
    visit: &mut dyn FnMut(&str, &'a JSONSchemaProps),
) {
    visit(path, schema);
    for (key, child) in children(schema) {
        walk(child, &format!("{path}.{key}"), visit);
    }
}

#[test]
fn five_crds_in_a_fixed_order() {
    let kinds: Vec<String> = crds().into_iter().map(|c| c.spec.names.kind).collect();
    assert_eq!(
        kinds,
        [
            "DomainPool",
            "ClusterRegistry",
            "Registry",
            "Project",
            "Environment"
        ]
    );
    let yaml = crds_yaml();
    assert_eq!(
        yaml.matches("\n---\n").count() + usize::from(yaml.starts_with("---\n")),
        5
    );
    assert_eq!(yaml, crds_yaml(), "deterministic");
    let docs: Vec<CustomResourceDefinition> = serde_yaml_ng::Deserializer::from_str(&yaml)
        .map(|d| serde::Deserialize::deserialize(d).expect("CRD document"))
        .collect();
    assert_eq!(docs.len(), 5);
}

#[test]
fn names_scopes_and_subresources() {
    let expected = [
        ("DomainPool", "domainpools", "Cluster", "dp"),
        ("ClusterRegistry", "clusterregistries", "Cluster", "creg"),
        ("Registry", "registries", "Namespaced", "reg"),
        ("Project", "projects", "Cluster", "proj"),
        ("Environment", "environments", "Namespaced", "env"),
    ];
    // Built-in kubectl short names a Kapsa short name must not shadow.
    let builtin = [
        "cm", "cs", "ds", "ep", "ev", "hpa", "ing", "limits", "no", "ns", "pc", "pdb", "po", "psp",
        "pv", "pvc", "quota", "rc", "rs", "sa", "sc", "sts", "svc", "deploy", "cj", "csr", "crd",
        "crds", "netpol", "ingclass", "csinode",
    ];
    for (kind, plural, scope, short) in expected {
        let crd = crd(kind);
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some(format!("{plural}.kapsa.dev").as_str())
        );
        assert_eq!(crd.spec.group, "kapsa.dev");
        assert_eq!(crd.spec.scope, scope, "{kind}");
        assert_eq!(crd.spec.names.plural, plural);
        assert_eq!(
            crd.spec.names.singular.as_deref(),
            Some(kind.to_ascii_lowercase().as_str())
        );
        assert_eq!(
            crd.spec.names.short_names,
            Some(vec![short.to_owned()]),
            "{kind}"
        );
        assert!(
            !builtin.contains(&short),
            "{short} collides with a built-in short name"
        );
        assert_eq!(
            crd.spec.names.categories,
            Some(vec!["kapsa".to_owned()]),
            "{kind}"
        );
        assert_eq!(crd.spec.versions.len(), 1);
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.served && version.storage);
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{kind} has a status subresource"
        );
        let columns = version
            .additional_printer_columns
            .as_deref()
            .unwrap_or_default();
        assert!(
            columns.iter().any(|c| c.name == "Age"),
            "{kind} has an Age column"
        );
        assert!(columns.len() >= 3, "{kind} has printer columns");
        let conditions = at(root_schema(&crd), "status.conditions");
        assert_eq!(
            conditions.x_kubernetes_list_type.as_deref(),
            Some("map"),
            "{kind}"
        );
        assert_eq!(
            conditions.x_kubernetes_list_map_keys,
            Some(vec!["type".to_owned()]),
            "{kind}"
        );
        assert!(
            at(root_schema(&crd), "status.observedGeneration")
                .type_
                .as_deref()
                == Some("integer")
        );
    }
}

#[test]
fn printer_columns_answer_the_first_question() {
    let names = |kind: &str| -> Vec<String> {
        crd(kind).spec.versions[0]
            .additional_printer_columns
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c.priority.unwrap_or(0) == 0)
            .map(|c| c.name)
            .collect()
    };
    assert_eq!(
        names("Project"),
        ["Host", "Ready", "Commit", "Previews", "Age"]
    );
    assert_eq!(
        names("Environment"),
        ["Project", "Type", "Branch", "Phase", "URL", "Age"]
    );
    assert_eq!(
        names("DomainPool"),
        ["Domains", "Issuer", "Challenge", "Ready", "Age"]
    );
    assert_eq!(
        names("ClusterRegistry"),
        ["Provider", "Server", "Ready", "Age"]
    );
    assert_eq!(names("Registry"), ["Provider", "Server", "Ready", "Age"]);
    let ready = crd("Project").spec.versions[0]
        .additional_printer_columns
        .clone()
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.name == "Ready")
        .expect("Ready column");
    assert_eq!(
        ready.json_path,
        r#".status.conditions[?(@.type=="Ready")].status"#
    );
}

#[test]
fn every_property_has_a_description() {
    for crd in crds() {
        let kind = crd.spec.names.kind.clone();
        let root = root_schema(&crd);
        assert!(
            root.description.as_deref().is_some_and(|d| d.len() > 40),
            "{kind}: root description"
        );
        let mut missing = Vec::new();
        walk(root, &kind, &mut |path, schema| {
            if let Some(props) = &schema.properties {
                for (name, prop) in props {
                    if prop
                        .description
                        .as_deref()
                        .is_none_or(|d| d.trim().is_empty())
                    {
                        missing.push(format!("{path}.{name}"));
                    }
                }
            }
        });
        assert!(
            missing.is_empty(),
            "properties without description: {missing:?}"
        );
    }
}

#[test]
fn cel_rules_have_messages_and_bounded_inputs() {
    let mut rules = 0;
    for crd in crds() {
        let kind = crd.spec.names.kind.clone();
        walk(root_schema(&crd), &kind, &mut |path, schema| {
            for rule in schema
                .x_kubernetes_validations
                .as_deref()
                .unwrap_or_default()
            {
                rules += 1;
                let message = rule.message.as_deref().unwrap_or_default();
                assert!(
                    !message.is_empty(),
                    "{path}: rule {:?} has no message",
                    rule.rule
                );
                assert!(
                    message.contains("spec") || message.contains("metadata.name"),
                    "{path}: message should name the field: {message}"
                );
                match schema.type_.as_deref() {
                    Some("string") => assert!(
                        schema.max_length.is_some() || schema.enum_.is_some(),
                        "{path}: CEL on a string needs maxLength"
                    ),
                    Some("array") => {
                        assert!(
                            schema.max_items.is_some(),
                            "{path}: CEL on a list needs maxItems"
                        );
                        if let Some(JSONSchemaPropsOrArray::Schema(items)) = &schema.items
                            && items.type_.as_deref() == Some("string")
                        {
                            assert!(
                                items.max_length.is_some(),
                                "{path}: CEL on a list needs maxLength on items"
                            );
                        }
                    }
                    Some("object") if schema.properties.is_none() => {
                        assert!(
                            schema.max_properties.is_some(),
                            "{path}: CEL on a map needs maxProperties"
                        );
                    }
                    _ => {}
                }
            }
            // Every string that a rule on its parent object reads is bounded.
            if schema.x_kubernetes_validations.is_some()
                && let Some(props) = &schema.properties
            {
                for (name, prop) in props {
                    if prop.type_.as_deref() == Some("string")
                        && prop.enum_.is_none()
                        && prop.format.is_none()
                    {
                        let read = schema
                            .x_kubernetes_validations
                            .as_deref()
                            .unwrap_or_default()
                            .iter()
                            .any(|r| r.rule.contains(&format!("self.{name}.")));
                        if read {
                            assert!(
                                prop.max_length.is_some(),
                                "{path}.{name}: read by CEL, needs maxLength"
                            );
                        }
                    }
                }
            }
        });
    }
    assert!(rules >= 40, "expected at least 40 CEL rules, found {rules}");
}

#[test]
fn limits_in_schema_match_naming_constants() {
    let project = root_schema(&crd("Project")).clone();
    let rules: Vec<String> = project
        .x_kubernetes_validations
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.rule)
        .collect();
    assert!(rules.contains(&format!(
        "size(self.metadata.name) <= {MAX_PROJECT_NAME_LEN}"
    )));
    let env = root_schema(&crd("Environment")).clone();
    let rules: Vec<String> = env
        .x_kubernetes_validations
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.rule)
        .collect();
    assert!(rules.contains(&format!(
        "size(self.metadata.name) <= {MAX_ENVIRONMENT_NAME_LEN}"
    )));
    let pool = crd("DomainPool");
    let domains = at(root_schema(&pool), "spec.domains");
    let item = match &domains.items {
        Some(JSONSchemaPropsOrArray::Schema(s)) => s.as_ref(),
        _ => panic!("domains items"),
    };
    assert_eq!(item.max_length, Some(MAX_BASE_DOMAIN_LEN as i64));
    assert_eq!(domains.x_kubernetes_list_type.as_deref(), Some("set"));
    let env_crd = crd("Environment");
    let project_field = at(root_schema(&env_crd), "spec.project");
    assert_eq!(project_field.max_length, Some(MAX_PROJECT_NAME_LEN as i64));
}

#[test]
fn immutability_rules_exist() {
    let project = crd("Project");
    let spec = at(root_schema(&project), "spec");
    let spec_rules: Vec<&str> = spec
        .x_kubernetes_validations
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|r| r.rule.as_str())
        .collect();
    assert!(spec_rules.contains(&"has(self.__namespace__) == has(oldSelf.__namespace__)"));
    let namespace = at(spec, "namespace");
    assert!(
        namespace
            .x_kubernetes_validations
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|r| r.rule == "self == oldSelf")
    );
    let env = crd("Environment");
    for field in ["spec.project", "spec.type"] {
        let schema = at(root_schema(&env), field);
        assert!(
            schema
                .x_kubernetes_validations
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|r| r.rule == "self == oldSelf"),
            "{field} is immutable"
        );
    }
}

/// The schema `default` at `path` equals `expected`.
fn assert_default(kind: &str, path: &str, expected: Value) {
    let crd = crd(kind);
    let schema = at(root_schema(&crd), path);
    let actual = schema.default.as_ref().map(|d| d.0.clone());
    assert_eq!(actual, Some(expected), "{kind} {path} default");
}

#[test]
fn schema_defaults() {
    assert_default("Project", "spec.source.pollInterval", json!("60s"));
    assert_default("Project", "spec.source.git.branch", json!("main"));
    assert_default("Project", "spec.source.git.allowInsecureHttp", json!(false));
    assert_default("Project", "spec.build.strategy", json!("Buildpacks"));
    assert_default("Project", "spec.runtime.port", json!(8080));
    assert_default("Project", "spec.runtime.replicas", json!(1));
    assert_default("Project", "spec.runtime.metrics.path", json!("/metrics"));
    assert_default("Project", "spec.previewEnvironments.enabled", json!(false));
    assert_default("Project", "spec.previewEnvironments.ttl", json!("72h"));
    assert_default(
        "Project",
        "spec.previewEnvironments.maxEnvironments",
        json!(10),
    );
    assert_default("Project", "spec.build", json!({"strategy": "Buildpacks"}));
    assert_default(
        "Project",
        "spec.runtime",
        json!({"port": 8080, "replicas": 1}),
    );
    assert_default(
        "Project",
        "spec.previewEnvironments",
        json!({"enabled": false, "ttl": "72h", "maxEnvironments": 10, "replicas": 1}),
    );
    assert_default("Project", "spec.registryRef.kind", json!("ClusterRegistry"));
    assert_default(
        "Project",
        "spec.build.builderRef.kind",
        json!("ClusterBuilder"),
    );
    assert_default("DomainPool", "spec.challenge", json!("HTTP01"));
    assert_default("DomainPool", "spec.ingressClassName", json!("nginx"));
    assert_default("DomainPool", "spec.default", json!(false));
    assert_default("ClusterRegistry", "spec.provider", json!("Generic"));
    assert_default("ClusterRegistry", "spec.insecure", json!(false));
    assert_default("Registry", "spec.provider", json!("Generic"));
}

#[test]
fn serde_defaults_match_schema_defaults() {
    let project: Project = serde_json::from_value(json!({
        "apiVersion": "kapsa.dev/v1alpha1",
        "kind": "Project",
        "metadata": {"name": "shop"},
        "spec": {
            "source": {"git": {"url": "https://github.com/acme/shop.git"}},
            "registryRef": {"name": "harbor"}
        }
    }))
    .expect("minimal project");
    let spec = &project.spec;
    assert_eq!(spec.namespace, None);
    assert_eq!(spec.source.poll_interval, "60s");
    assert_eq!(spec.source.git.branch, "main");
    assert!(!spec.source.git.allow_insecure_http);
    assert_eq!(spec.source.context_dir, None);
    assert_eq!(spec.build.strategy, kapsa_api::BuildStrategy::Buildpacks);
    assert_eq!(
        spec.registry_ref.kind,
        kapsa_api::RegistryKind::ClusterRegistry
    );
    assert_eq!(spec.runtime.port, 8080);
    assert_eq!(spec.runtime.replicas, 1);
    assert!(!spec.preview_environments.enabled);
    assert_eq!(spec.preview_environments.ttl, "72h");
    assert_eq!(spec.preview_environments.max_environments, 10);
    assert!(spec.preview_environments.branches.is_empty());
    assert!(project.status.is_none());

    // What the API server stores after defaulting is what serde produces.
    let stored = serde_json::to_value(spec).expect("serialize");
    assert_eq!(stored["build"], json!({"strategy": "Buildpacks"}));
    assert_eq!(stored["runtime"], json!({"port": 8080, "replicas": 1}));
    assert_eq!(
        stored["previewEnvironments"],
        json!({"enabled": false, "ttl": "72h", "maxEnvironments": 10, "replicas": 1})
    );

    let pool: DomainPool = serde_json::from_value(json!({
        "apiVersion": "kapsa.dev/v1alpha1",
        "kind": "DomainPool",
        "metadata": {"name": "default"},
        "spec": {"domains": ["apps.example.com"]}
    }))
    .expect("minimal pool");
    assert_eq!(pool.spec.challenge, kapsa_api::Challenge::HTTP01);
    assert_eq!(pool.spec.ingress_class_name, "nginx");
    assert!(!pool.spec.default);
    assert!(pool.spec.cluster_issuer_ref.is_none());
}

/// The CEL rules of a property, as `(rule, message)` pairs.
fn rules_at(kind: &str, path: &str) -> Vec<(String, String)> {
    let crd = crd(kind);
    at(root_schema(&crd), path)
        .x_kubernetes_validations
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|r| (r.rule, r.message.unwrap_or_default()))
        .collect()
}

#[test]
fn duration_rules_are_the_parsers_language_and_minimums() {
    use kapsa_api::duration;
    use kapsa_api::validation::cel_quote;
    for (path, min) in [
        ("spec.source.pollInterval", duration::MIN_POLL_INTERVAL),
        ("spec.previewEnvironments.ttl", duration::MIN_PREVIEW_TTL),
    ] {
        let rules = rules_at("Project", path);
        let pattern = format!("self.matches({})", cel_quote(duration::DURATION));
        assert!(
            rules.iter().any(|(rule, _)| rule == &pattern),
            "{path}: {rules:?}"
        );
        let minimum = format!("duration('{}')", duration::as_seconds(min));
        assert!(
            rules.iter().any(|(rule, _)| rule.contains(&minimum)),
            "{path}: {rules:?}"
        );
        let crd = crd("Project");
        let schema = at(root_schema(&crd), path);
        assert_eq!(
            schema.max_length,
            Some(duration::MAX_DURATION_LEN as i64),
            "{path}"
        );
        let default = schema.default.as_ref().expect("a default").0.clone();
        let parsed = duration::parse(default.as_str().expect("a string"));
        assert!(
            parsed.is_some_and(|d| d >= min),
            "{path}: default {default}"
        );
    }
}

#[test]
fn quantity_maps_check_every_value() {
    for (kind, path) in [
        ("Project", "spec.runtime.resources.requests"),
        ("Project", "spec.runtime.resources.limits"),
        ("Project", "spec.resourceQuota.hard"),
    ] {
        let crd = crd(kind);
        let map = at(root_schema(&crd), path);
        assert!(map.max_properties.is_some(), "{path}: maxProperties");
        let values = match &map.additional_properties {
            Some(JSONSchemaPropsOrBool::Schema(s)) => s.as_ref(),
            other => panic!("{path}: additionalProperties {other:?}"),
        };
        assert_eq!(values.x_kubernetes_int_or_string, Some(true), "{path}");
        assert!(values.max_length.is_some(), "{path}: maxLength");
        let rules: Vec<&str> = values
            .x_kubernetes_validations
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|r| r.rule.as_str())
            .collect();
        assert!(
            rules.contains(&"isQuantity(string(self))"),
            "{path}: {rules:?}"
        );
        assert!(
            rules
                .iter()
                .any(|r| r.contains("isLessThan(quantity('0'))")),
            "{path}: {rules:?}"
        );
    }
}

#[test]
fn git_urls_refuse_what_the_operator_refuses() {
    let rules = rules_at("Project", "spec.source.git.url");
    let all: String = rules.iter().map(|(r, _)| r.as_str()).collect();
    assert!(!all.contains("git://"), "{all}");
    assert!(!all.contains("|git)"), "{all}");
    let crd = crd("Project");
    let description = at(root_schema(&crd), "spec.source.git.url")
        .description
        .clone()
        .unwrap_or_default();
    assert!(description.contains("`git://`"), "{description}");
    assert!(description.contains("refused"), "{description}");
}

#[test]
fn map_key_rules_name_the_key() {
    for (path, field) in [
        (
            "spec.runtime.resources.requests",
            "spec.runtime.resources.requests[",
        ),
        (
            "spec.runtime.resources.limits",
            "spec.runtime.resources.limits[",
        ),
        ("spec.resourceQuota.hard", "spec.resourceQuota.hard["),
        ("spec.runtime.resources", "spec.runtime.resources.requests["),
    ] {
        let crd = crd("Project");
        let rules = at(root_schema(&crd), path)
            .x_kubernetes_validations
            .clone()
            .unwrap_or_default();
        assert!(!rules.is_empty(), "{path}");
        for rule in rules {
            let expression = rule.message_expression.unwrap_or_default();
            assert!(
                expression.starts_with(&format!("'{field}' + ")),
                "{path}: {expression:?}"
            );
            assert!(
                rule.message.is_some_and(|m| m.starts_with("spec.")),
                "{path}: a fallback message"
            );
        }
    }
}
