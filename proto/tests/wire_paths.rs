//! Pins the wire paths and the message encoding that the original Go code
//! uses: a change here breaks mixed fleets.

use greet_proto::{paths, GreetRequest, GreetResponse};
use prost::Message;

#[test]
fn generated_service_name_has_no_package() {
    assert_eq!(
        <greet_proto::GreetServer<Dummy> as tonic::server::NamedService>::NAME,
        "Greet"
    );
    assert_eq!(paths::MORNING, "/Greet/Morning");
    assert_eq!(paths::NIGHT, "/Greet/Night");
}

#[test]
fn generated_client_uses_the_pinned_paths() {
    // The generated client code holds the path literals; check they are the
    // ones we pin, so a regenerated proto with a `package` line fails here.
    let src = include_str!(concat!(env!("OUT_DIR"), "/_.rs"));
    assert!(src.contains("\"/Greet/Morning\""), "Morning path changed");
    assert!(src.contains("\"/Greet/Night\""), "Night path changed");
    assert!(
        !src.contains("\"/greet.Greet/"),
        "a package prefix appeared"
    );
}

#[test]
fn field_numbers_match_the_original() {
    // name = 1 (tag 0x0a), message = 1 (0x0a), from = 2 (0x12).
    let req = GreetRequest {
        name: "JetWu".into(),
    };
    assert_eq!(req.encode_to_vec(), b"\x0a\x05JetWu");
    let resp = GreetResponse {
        message: "m".into(),
        from: "f".into(),
    };
    assert_eq!(resp.encode_to_vec(), b"\x0a\x01m\x12\x01f");
}

#[derive(Clone, Copy)]
struct Dummy;

#[tonic::async_trait]
impl greet_proto::Greet for Dummy {
    async fn morning(
        &self,
        _: tonic::Request<GreetRequest>,
    ) -> Result<tonic::Response<GreetResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("dummy"))
    }
    async fn night(
        &self,
        _: tonic::Request<GreetRequest>,
    ) -> Result<tonic::Response<GreetResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("dummy"))
    }
}
