//! `.npy` reading (src/io/npy.rs): values and shapes, and headers that do
//! not describe their data (found by tests/fuzz.rs) refused before
//! anything is allocated.

mod common;

use common::npy_bytes;
use gif_fr::io::npy;
use gif_fr::Error;

#[test]
fn npy_headers_found_by_the_fuzzer_are_refused() {
    // Each of these panicked inside npyz or made it allocate gigabytes.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.npy");
    let refused = |bytes: &[u8], needle: &str| {
        std::fs::write(&p, bytes).unwrap();
        match npy::read_npy(&p) {
            Err(Error::File { message, .. }) => assert!(message.contains(needle), "{needle}: {message}"),
            other => panic!("{needle}: {other:?}"),
        }
    };
    // A zero dimension first: the total product is 0, npyz's strides are not.
    refused(&npy_bytes("<f4", &[0, 1 << 40, 1 << 40], &[]), "more elements");
    // A header length (u32, version 2) far past the end of the file.
    let mut v2 = npy_bytes("<f4", &[2], &[0; 8]);
    v2[6] = 2;
    refused(&v2, "header of");
    refused(b"\x93NUMPY\x07\x00\x10\x00", "format version 7");
    refused(b"\x93NUMPY\x01", "magic");
}

#[test]
fn npy_input_is_read_as_f32_rows() {
    // A hand-made .npy v1.0 file: 3 x 2 little-endian f64.
    let values: Vec<u8> = [1.0f64, 2.0, 3.0, 4.0, 5.0, 6.5].iter().flat_map(|v| v.to_le_bytes()).collect();
    let bytes = npy_bytes("<f8", &[3, 2], &values);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.npy");
    std::fs::write(&p, &bytes).unwrap();
    let (data, r, c) = npy::read_npy_matrix(&p).unwrap();
    assert_eq!((data, r, c), (vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.5], 3, 2));
}
