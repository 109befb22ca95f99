//! Certificates and keys for a throwaway control plane: a CA, the API server's
//! serving certificate, and the service-account signing key.

use std::net::{IpAddr, Ipv4Addr};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// PEM-encoded material written into the control plane's folder.
pub struct ControlPlanePki {
    pub ca_cert_pem: String,
    /// The CA's key, kept so that more client certificates can be minted
    /// later ([`client_certificate`]).
    pub ca_key_pem: String,
    pub serving_cert_pem: String,
    pub serving_key_pem: String,
    /// A client certificate in `system:masters`, for the admin kubeconfig.
    pub admin_cert_pem: String,
    pub admin_key_pem: String,
    /// The API server's client certificate for kubelets (`kubectl logs`,
    /// `exec`): user `kube-apiserver-kubelet-client` in `system:masters`.
    pub kubelet_client_cert_pem: String,
    pub kubelet_client_key_pem: String,
    pub service_account_key_pem: String,
    pub service_account_public_key_pem: String,
}

impl ControlPlanePki {
    pub fn generate() -> Result<Self, rcgen::Error> {
        let ca_key = KeyPair::generate()?;
        let ca_key_pem = ca_key.serialize_pem();
        let ca = CertifiedIssuer::self_signed(ca_params()?, ca_key)?;

        let mut serving_params = CertificateParams::new(vec![
            "localhost".to_string(),
            "kubernetes".to_string(),
            "kubernetes.default.svc".to_string(),
        ])?;
        serving_params.distinguished_name = name("kube-apiserver");
        serving_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        serving_params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        // The first address of the service range, where the `kubernetes` Service points.
        serving_params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1))));
        let serving_key = KeyPair::generate()?;
        let serving_cert = serving_params.signed_by(&serving_key, &ca)?;

        let admin_key = KeyPair::generate()?;
        let admin_cert =
            client_params("kapsa-admin", Some("system:masters"))?.signed_by(&admin_key, &ca)?;

        let kubelet_client_key = KeyPair::generate()?;
        let kubelet_client_cert =
            client_params("kube-apiserver-kubelet-client", Some("system:masters"))?
                .signed_by(&kubelet_client_key, &ca)?;

        let service_account_key = KeyPair::generate()?;
        Ok(Self {
            kubelet_client_cert_pem: kubelet_client_cert.pem(),
            kubelet_client_key_pem: kubelet_client_key.serialize_pem(),
            ca_cert_pem: ca.pem(),
            ca_key_pem,
            admin_cert_pem: admin_cert.pem(),
            admin_key_pem: admin_key.serialize_pem(),
            serving_cert_pem: serving_cert.pem(),
            serving_key_pem: serving_key.serialize_pem(),
            service_account_key_pem: service_account_key.serialize_pem(),
            service_account_public_key_pem: service_account_key.public_key_pem(),
        })
    }
}

/// The CA's parameters. Deterministic, so that the CA can be rebuilt as an
/// issuer from its key alone (the authority key identifier is derived from
/// the key).
fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name = name("kapsa-testenv-ca");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// A client certificate's parameters: the API server takes the common name
/// as the user name and each organization as a group. rcgen keeps one value
/// per attribute type, so only a single group fits here; several are written
/// by [`client_certificate`].
fn client_params(user: &str, group: Option<&str>) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = name(user);
    if let Some(group) = group {
        params
            .distinguished_name
            .push(DnType::OrganizationName, group);
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// A serving certificate for `dns_names` and `ips` signed by the control
/// plane's CA (whose key is `ca_key_pem`), e.g. a kubelet's, which the API
/// server verifies. Returns the certificate and its key, PEM.
pub fn serving_certificate(
    ca_key_pem: &str,
    dns_names: &[String],
    ips: &[IpAddr],
) -> Result<(String, String), rcgen::Error> {
    let ca = Issuer::new(ca_params()?, KeyPair::from_pem(ca_key_pem)?);
    let mut params = CertificateParams::new(dns_names.to_vec())?;
    params.distinguished_name = name(dns_names.first().map(String::as_str).unwrap_or("kapsa"));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A client certificate for `user` in `groups`, signed by the control plane's
/// CA (whose key is `ca_key_pem`): common name `user`, one organization per
/// group. Returns the certificate and its key, PEM.
pub fn client_certificate(
    ca_key_pem: &str,
    user: &str,
    groups: &[&str],
) -> Result<(String, String), rcgen::Error> {
    let ca = Issuer::new(ca_params()?, KeyPair::from_pem(ca_key_pem)?);
    let key = KeyPair::generate()?;
    let single = match groups {
        [] => None,
        [group] => Some(*group),
        [first, ..] => Some(*first),
    };
    let cert = client_params(user, single)?.signed_by(&key, &ca)?;
    let cert_pem = if groups.len() > 1 {
        der::certificate_pem(&der::with_subject(
            cert.der(),
            &der::subject(user, groups),
            ca.key(),
        )?)
    } else {
        cert.pem()
    };
    Ok((cert_pem, key.serialize_pem()))
}

/// Just enough DER to give a certificate a subject with several
/// organizations (which rcgen cannot express) and sign it again.
mod der {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use rcgen::SigningKey;

    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const OID: u8 = 0x06;
    const UTF8_STRING: u8 = 0x0c;
    const BIT_STRING: u8 = 0x03;
    /// `[0] EXPLICIT Version`, first in a v3 TBSCertificate.
    const VERSION: u8 = 0xa0;
    /// 2.5.4.3 and 2.5.4.10.
    const COMMON_NAME: [u8; 3] = [0x55, 0x04, 0x03];
    const ORGANIZATION: [u8; 3] = [0x55, 0x04, 0x0a];

    /// A tag-length-value with a definite length.
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = content.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes = len.to_be_bytes();
            let skip = bytes.iter().take_while(|b| **b == 0).count();
            out.push(0x80 | (bytes.len() - skip) as u8);
            out.extend_from_slice(&bytes[skip..]);
        }
        out.extend_from_slice(content);
        out
    }

    /// The first element of `input` (whole, header included), its content,
    /// and what follows it.
    fn split(input: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
        let first = *input.get(1)?;
        let (header, len) = if first < 0x80 {
            (2, first as usize)
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 {
                return None;
            }
            let len = input
                .get(2..2 + n)?
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | *b as usize);
            (2 + n, len)
        };
        let end = header.checked_add(len)?;
        let element = input.get(..end)?;
        Some((element, &element[header..], &input[end..]))
    }

    fn attribute(oid: &[u8], value: &str) -> Vec<u8> {
        let pair = [tlv(OID, oid), tlv(UTF8_STRING, value.as_bytes())].concat();
        tlv(SET, &tlv(SEQUENCE, &pair))
    }

    /// `CN=user, O=group, O=group...`, each in its own RDN, as Kubernetes
    /// reads them (groups = every O, in order).
    pub fn subject(user: &str, groups: &[&str]) -> Vec<u8> {
        let mut rdns = attribute(&COMMON_NAME, user);
        for group in groups {
            rdns.extend(attribute(&ORGANIZATION, group));
        }
        tlv(SEQUENCE, &rdns)
    }

    /// `certificate` with its subject replaced by `subject`, signed again
    /// with `issuer_key` (the key that signed it, so the signature algorithm
    /// it names stays right).
    pub fn with_subject(
        certificate: &[u8],
        subject: &[u8],
        issuer_key: &impl SigningKey,
    ) -> Result<Vec<u8>, rcgen::Error> {
        let malformed = || rcgen::Error::CouldNotParseCertificate;
        let (_, body, _) = split(certificate).ok_or_else(malformed)?;
        let (_, tbs, rest) = split(body).ok_or_else(malformed)?;
        let (signature_algorithm, _, _) = split(rest).ok_or_else(malformed)?;
        let mut fields = Vec::new();
        let mut rest = tbs;
        while !rest.is_empty() {
            let (field, _, next) = split(rest).ok_or_else(malformed)?;
            fields.push(field);
            rest = next;
        }
        // version?, serialNumber, signature, issuer, validity, subject, ...
        let index = if fields.first().map(|f| f[0]) == Some(VERSION) {
            5
        } else {
            4
        };
        match fields.get(index) {
            Some(field) if field[0] == SEQUENCE => fields[index] = subject,
            _ => return Err(malformed()),
        }
        let tbs = tlv(SEQUENCE, &fields.concat());
        let mut signature = vec![0u8]; // no unused bits
        signature.extend(issuer_key.sign(&tbs)?);
        Ok(tlv(
            SEQUENCE,
            &[
                tbs,
                signature_algorithm.to_vec(),
                tlv(BIT_STRING, &signature),
            ]
            .concat(),
        ))
    }

    pub fn certificate_pem(der: &[u8]) -> String {
        let base64 = BASE64.encode(der);
        let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
        for line in base64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).unwrap_or_default());
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
        pem
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn lengths_round_trip() {
            for len in [0, 1, 127, 128, 255, 256, 70_000] {
                let content = vec![7u8; len];
                let encoded = tlv(SEQUENCE, &content);
                let (whole, inner, rest) = split(&encoded).unwrap();
                assert_eq!(
                    (whole.len(), inner, rest.len()),
                    (encoded.len(), &content[..], 0)
                );
            }
            assert!(split(&[SEQUENCE, 0x82, 0x01]).is_none(), "truncated length");
            assert!(
                split(&[SEQUENCE, 0x05, 0x00]).is_none(),
                "truncated content"
            );
        }
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// A self-signed certificate and key for `dns_names`, as the cert-manager
/// simulator issues them.
pub fn self_signed_certificate(dns_names: &[String]) -> Result<(String, String), rcgen::Error> {
    let mut params = CertificateParams::new(dns_names.to_vec())?;
    params.distinguished_name = name(dns_names.first().map(String::as_str).unwrap_or("kapsa"));
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::ParsedExtension;
    use x509_parser::prelude::*;

    fn parse(pem: &str) -> Vec<u8> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("PEM");
        pem.contents
    }

    fn key_ids(cert: &X509Certificate<'_>) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        let (mut subject, mut authority) = (None, None);
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => subject = Some(id.0.to_vec()),
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    authority = aki.key_identifier.as_ref().map(|id| id.0.to_vec())
                }
                _ => {}
            }
        }
        (subject, authority)
    }

    #[test]
    fn client_certificate_names_user_and_groups_and_chains_to_the_ca() {
        let pki = ControlPlanePki::generate().unwrap();
        let ca_der = parse(&pki.ca_cert_pem);
        let (_, ca) = parse_x509_certificate(&ca_der).unwrap();
        let (ca_subject_id, _) = key_ids(&ca);
        assert!(ca_subject_id.is_some());
        let group_sets: [&[&str]; 4] = [
            &[],
            &["system:masters"],
            &["system:masters", "team-a"],
            &["team-a", "system:masters", "team-b"],
        ];
        for groups in group_sets {
            let (cert_pem, key_pem) =
                client_certificate(&pki.ca_key_pem, "kapsa-operator", groups).unwrap();
            assert!(key_pem.contains("PRIVATE KEY"));
            let der = parse(&cert_pem);
            let (rest, cert) = parse_x509_certificate(&der).unwrap();
            assert!(rest.is_empty());
            let cn: Vec<_> = cert
                .subject()
                .iter_common_name()
                .map(|a| a.as_str().unwrap().to_string())
                .collect();
            let orgs: Vec<_> = cert
                .subject()
                .iter_organization()
                .map(|a| a.as_str().unwrap().to_string())
                .collect();
            assert_eq!(cn, ["kapsa-operator"]);
            assert_eq!(orgs, groups, "one organization per group, in order");
            assert_eq!(cert.issuer(), ca.subject());
            assert_eq!(key_ids(&cert).1, ca_subject_id, "signed by this CA's key");
            assert_eq!(cert.signature_algorithm, ca.signature_algorithm);
            let usages = cert.extended_key_usage().unwrap().expect("EKU").value;
            assert!(usages.client_auth && !usages.server_auth);
        }

        // A certificate minted from another CA's key does not chain to this one.
        let other = ControlPlanePki::generate().unwrap();
        let (other_pem, _) = client_certificate(&other.ca_key_pem, "kapsa-operator", &[]).unwrap();
        let other_der = parse(&other_pem);
        let (_, other_cert) = parse_x509_certificate(&other_der).unwrap();
        assert_ne!(key_ids(&other_cert).1, ca_subject_id);
    }
}
