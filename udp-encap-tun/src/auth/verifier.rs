//! The client's check of the server when it trusts a *pinned* certificate:
//! the SHA-256 of the server's end-entity certificate (DER) must equal the
//! pin from the credential file. Only the certificate chain check is
//! replaced: the TLS 1.3 handshake signature is still verified with the
//! certificate's key through the crypto provider, so a peer that merely
//! replays the certificate without its private key fails the handshake.
//!
//! Name, validity dates and intermediates are ignored on purpose: the pin
//! names exactly one certificate, which `credentials server` makes valid for
//! centuries.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, OtherError, SignatureScheme};
use subtle::ConstantTimeEq;

use super::credentials::{format_pin, sha256};

#[derive(Debug)]
pub struct PinnedServerCert {
    pin: [u8; 32],
    algs: WebPkiSupportedAlgorithms,
}

impl PinnedServerCert {
    pub fn new(pin: [u8; 32], provider: &rustls::crypto::CryptoProvider) -> PinnedServerCert {
        PinnedServerCert {
            pin,
            algs: provider.signature_verification_algorithms,
        }
    }
}

/// The server presented another certificate than the pinned one.
#[derive(Debug, thiserror::Error)]
#[error(
    "the server's certificate is {got}, but the credential pins {expected}: wrong server address, \
     the server's certificate was remade (make a new credential), or someone is in between"
)]
pub struct PinMismatch {
    pub expected: String,
    pub got: String,
}

impl ServerCertVerifier for PinnedServerCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let got = sha256(end_entity.as_ref());
        if bool::from(got.ct_eq(&self.pin)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(PinMismatch {
                    expected: format_pin(&self.pin),
                    got: format_pin(&got),
                })),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // The client config offers TLS 1.3 only (SPEC decision 2); reaching
        // here means something offered 1.2 anyway: refuse.
        Err(Error::General(
            "TLS 1.2 is not allowed for authentication".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
