//! The `fabric-coordinator` binary: it prints its address as the first line
//! on stdout, its plaintext health port as the second and its metrics port
//! as the third, answers health
//! checks once ready (on the health port without any credentials, as
//! Kubernetes' probes do), refuses plaintext on its TLS port, and stops
//! cleanly on SIGTERM.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use fabric_trust::Role;
use fabric_trust::pki::PkiDir;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

fn address_after(line: &str, prefix: &str) -> String {
    line.trim()
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("unexpected line {line:?}"))
        .to_owned()
}

#[tokio::test]
async fn serve_prints_its_addresses_answers_health_in_plaintext_and_stops_on_sigterm() {
    let temp = tempfile::tempdir().unwrap();
    let pki = PkiDir::open_or_init(&temp.path().join("ca"), "test CA").unwrap();
    let (cert, key) = pki
        .issue_into(Role::Coordinator, "test", temp.path())
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fabric-coordinator"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(temp.path().join("state"))
        .args(["--heartbeat-interval", "1s", "--log-format", "json"])
        .args(["--health-listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "127.0.0.1:0", "--tls-ca"])
        .arg(pki.ca_certificate())
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let address = address_after(&line, "fabric-coordinator listening on ");
    line.clear();
    stdout.read_line(&mut line).unwrap();
    let health_address = address_after(&line, "fabric-coordinator health listening on ");
    line.clear();
    stdout.read_line(&mut line).unwrap();
    let metrics_address = address_after(&line, "fabric-coordinator metrics listening on ");
    assert_ne!(metrics_address, health_address);

    // The probe's way: plaintext, no certificate.
    let channel = tonic::transport::Channel::from_shared(format!("http://{health_address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let mut serving = false;
    for _ in 0..100 {
        let status = health
            .check(HealthCheckRequest {
                service: fabric_proto::service_names::COORDINATOR.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        if status == ServingStatus::Serving {
            serving = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(serving, "never reported SERVING");

    // The health port serves nothing else.
    let other = fabric_proto::v1::coordinator_client::CoordinatorClient::new(
        tonic::transport::Channel::from_shared(format!("http://{health_address}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
    .list_jobs(fabric_proto::v1::ListJobsRequest {})
    .await
    .unwrap_err();
    assert_eq!(other.code(), tonic::Code::Unimplemented, "{other:?}");

    // A plaintext client gets nothing from the TLS port.
    let plaintext = tonic::transport::Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plaintext {
        let refused = HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await;
        assert!(refused.is_err(), "plaintext was answered: {refused:?}");
    }

    // A client left connected would have to answer the server's goodbye
    // while this thread blocks in `wait`.
    drop(health);
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

#[test]
fn without_credentials_it_refuses_to_start_and_says_what_is_missing() {
    let temp = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_fabric-coordinator"))
        .args(["serve", "--listen", "127.0.0.1:0", "--health-listen", ""])
        .args(["--metrics-listen", ""])
        .arg("--data-dir")
        .arg(temp.path().join("state"))
        .env_remove("FABRIC_COORDINATOR_TLS_CERT")
        .env_remove("FABRIC_COORDINATOR_TLS_KEY")
        .env_remove("FABRIC_COORDINATOR_TLS_CA")
        .env_remove("FABRIC_COORDINATOR_INSECURE_PLAINTEXT")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("tls_cert, tls_key and tls_ca")
            && stderr.contains("fabricctl pki issue --coordinator")
            && stderr.contains("--insecure-plaintext"),
        "{stderr}"
    );
}
