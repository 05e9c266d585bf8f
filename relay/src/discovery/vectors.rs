//! RFC 9497 appendix A.1.1 (ristretto255-SHA512, OPRF mode), test vectors 1 and 2,
//! through the `voprf` crate as the relay and a client use it. The crate's own vector
//! module is private, so the values are copied here from the RFC.

use voprf::{BlindedElement, EvaluationElement, Group, OprfClient, OprfServer, Ristretto255};

use super::oprf::Oprf;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

const SEED: &str = "a3a3a3a3a3a3a3a3a3a3a3a3a3a3a3a3a3a3a3a3a3a3a3a3a3a3a3a3a3a3a3a3";
const SK: &str = "5ebcea5ee37023ccb9fc2d2019f9d7737be85591ae8652ffa9ef0f4d37063b0e";
const BLIND: &str = "64d37aed22a27f5191de1c1d69fadb899d8862b58eb4220029e036ec4c1f6706";

struct Vector {
    input: &'static str,
    blinded: &'static str,
    evaluated: &'static str,
    output: &'static str,
}

const VECTORS: [Vector; 2] = [
    Vector {
        input: "00",
        blinded: "609a0ae68c15a3cf6903766461307e5c8bb2f95e7e6550e1ffa2dc99e412803c",
        evaluated: "7ec6578ae5120958eb2db1745758ff379e77cb64fe77b0b2d8cc917ea0869c7e",
        output: "527759c3d9366f277d8c6020418d96bb393ba2afb20ff90df23fb7708264e2f3\
                 ab9135e3bd69955851de4b1f9fe8a0973396719b7912ba9ee8aa7d0b5e24bcf6",
    },
    Vector {
        input: "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a",
        blinded: "da27ef466870f5f15296299850aa088629945a17d1f5b7f5ff043f76b3c06418",
        evaluated: "b4cbf5a4f1eeda5a63ce7b77c7d23f461db3fcab0dd28e4e17cecb5c90d02c25",
        output: "f4a74c9c592497375e796aa837e907b1a045d34306a749db9f34221f7e750cb4\
                 f2a6413a6bf6fa5e19ba6348eb673934a722a7ede2e7621306d18951e7cf2c73",
    },
];

#[test]
fn the_key_derives_as_in_the_rfc() {
    let server = OprfServer::<Ristretto255>::new_from_seed(&hex(SEED), b"test key").expect("key");
    assert_eq!(server.serialize().to_vec(), hex(SK));
}

#[test]
fn rfc_9497_a_1_1_vectors_through_the_crate() {
    let oprf = Oprf::from_key(&hex(SK)).expect("key");
    let server = OprfServer::<Ristretto255>::new_with_key(&hex(SK)).expect("key");
    for v in VECTORS {
        let input = hex(v.input);
        // The client's blinding, with the vector's blind.
        let blind = Ristretto255::deserialize_scalar(&hex(BLIND)).expect("scalar");
        let blinded = OprfClient::<Ristretto255>::deterministic_blind_unchecked(&input, blind)
            .expect("blind");
        assert_eq!(blinded.message.serialize().to_vec(), hex(v.blinded));

        // The relay's evaluation, as a batch of one through the relay's own path.
        let evaluated = oprf.evaluate_batch(&hex(v.blinded)).expect("a valid point");
        assert_eq!(evaluated, hex(v.evaluated));
        let by_crate =
            server.blind_evaluate(&BlindedElement::deserialize(&hex(v.blinded)).expect("point"));
        assert_eq!(by_crate.serialize().to_vec(), hex(v.evaluated));

        // The client's output, and the relay's own evaluation of the same input.
        let element = EvaluationElement::<Ristretto255>::deserialize(&evaluated).expect("point");
        let output = blinded.state.finalize(&input, &element).expect("finalize");
        assert_eq!(output.to_vec(), hex(v.output));
        assert_eq!(
            server.evaluate(&input).expect("evaluate").to_vec(),
            hex(v.output)
        );
    }
}
