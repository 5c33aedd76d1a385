//! MXNet RecordIO (src/io/recordio.rs): the writer's bytes equal dmlc-core's
//! framing written out by hand here (magic, length word with its 3-bit
//! continuation flag, padding, a record split at an aligned magic); random
//! records round-trip, in order and by key; image headers with one and
//! several labels; insightface's training-set convention (record 0's
//! header, property); corrupt files and indexes are typed errors.

use std::borrow::Cow;
use std::path::Path;

use gif_fr::io::recordio::{pack, unpack, FaceRecords, ImageHeader, IndexedRecords, RecordFile, RecordWriter, MAGIC};
use gif_fr::Error;
use rand::{Rng, SeedableRng};

/// dmlc-core's framing of one record, written independently of the crate:
/// a part per aligned magic, flags 0 (whole) or 1, 2…, 3.
fn frame(record: &[u8]) -> Vec<u8> {
    let word = |flag: u32, len: usize| ((flag << 29) | len as u32).to_le_bytes();
    let m = MAGIC.to_le_bytes();
    let cuts: Vec<usize> = (0..record.len() / 4).map(|i| 4 * i).filter(|&i| record[i..i + 4] == m).collect();
    let mut out = Vec::new();
    let mut from = 0;
    for (k, &i) in cuts.iter().enumerate() {
        out.extend(m);
        out.extend(word(if k == 0 { 1 } else { 2 }, i - from));
        out.extend(&record[from..i]);
        from = i + 4;
    }
    out.extend(m);
    out.extend(word(if cuts.is_empty() { 0 } else { 3 }, record.len() - from));
    out.extend(&record[from..]);
    out.resize(out.len() + (4 - record.len() % 4) % 4, 0);
    out
}

fn write(dir: &Path, records: &[Vec<u8>]) -> (std::path::PathBuf, std::path::PathBuf) {
    let (rec, idx) = (dir.join("train.rec"), dir.join("train.idx"));
    let mut w = RecordWriter::create(&rec, Some(&idx)).unwrap();
    for (k, r) in records.iter().enumerate() {
        w.write(k as u64, r).unwrap();
    }
    w.finish().unwrap();
    (rec, idx)
}

/// Records of random lengths (0 to 40 bytes), with the magic planted at
/// aligned and unaligned offsets, at the start, the end, twice in a row.
fn records(seed: u64) -> Vec<Vec<u8>> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let m = MAGIC.to_le_bytes();
    let mut out: Vec<Vec<u8>> = vec![vec![], b"abc".to_vec(), m.to_vec(), [m, m].concat(), [&m[..], b"xy"].concat()];
    out.push([b"12345678".as_slice(), &m, b"z"].concat());
    out.push([b"1".as_slice(), &m, b"unaligned"].concat());
    for _ in 0..40 {
        let n = r.random_range(0..40usize);
        let mut v: Vec<u8> = (0..n).map(|_| r.random()).collect();
        if n >= 8 && r.random_bool(0.5) {
            let at = 4 * r.random_range(0..n / 4);
            v[at..at + 4].copy_from_slice(&m);
        }
        out.push(v);
    }
    out
}

#[test]
fn the_writer_frames_as_dmlc_core_and_records_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let recs = records(1);
    let (rec, idx) = write(dir.path(), &recs);
    let want: Vec<u8> = recs.iter().flat_map(|r| frame(r)).collect();
    assert!(std::fs::read(&rec).unwrap() == want, "the writer's bytes differ from dmlc-core's framing");
    // Multi-part records were written (the magic was planted).
    assert!(want.chunks_exact(4).filter(|w| w == &MAGIC.to_le_bytes()).count() > recs.len() + 5);
    // In order.
    let f = RecordFile::open(&rec).unwrap();
    let got: Vec<Vec<u8>> = f.records().map(|r| r.unwrap().1.into_owned()).collect();
    assert_eq!(got, recs);
    // A one-part record is borrowed from the map, a split one assembled.
    assert!(matches!(f.read_at(0).unwrap().0, Cow::Borrowed(_)));
    // By key, in reverse.
    let ix = IndexedRecords::open(&rec, &idx).unwrap();
    assert_eq!(ix.len(), recs.len());
    for k in (0..recs.len()).rev() {
        assert_eq!(ix.get(k as u64).unwrap().as_ref(), &recs[k][..], "key {k}");
    }
    assert!(matches!(ix.get(999), Err(Error::File { .. })));
    // No temporary file is left.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn image_headers_with_one_and_several_labels() {
    let one = ImageHeader::new(7.0, 42);
    let p = pack(&one, b"JPEG");
    assert_eq!(p.len(), 24 + 4);
    assert_eq!(&p[..4], &0u32.to_le_bytes());
    assert_eq!(&p[4..8], &7.0f32.to_le_bytes());
    assert_eq!(&p[8..16], &42u64.to_le_bytes());
    let (h, img) = unpack(&p).unwrap();
    assert_eq!((h, img), (one, b"JPEG".as_slice()));
    // Several labels: flag = count, label 0, the labels before the image.
    let many = ImageHeader { flag: 2, labels: vec![3.0, 9.0], id: 1, id2: 5 };
    let p = pack(&many, b"PNG");
    assert_eq!(&p[..4], &2u32.to_le_bytes());
    assert_eq!(&p[4..8], &0f32.to_le_bytes());
    assert_eq!(&p[24..28], &3.0f32.to_le_bytes());
    assert_eq!(unpack(&p).unwrap(), (many, b"PNG".as_slice()));
    // Truncated headers and label lists.
    assert!(unpack(&p[..20]).is_err());
    let mut liar = pack(&ImageHeader::new(1.0, 0), b"");
    liar[..4].copy_from_slice(&1000u32.to_le_bytes());
    assert!(unpack(&liar).unwrap_err().contains("1000 labels"));
}

/// An insightface-style set: record 0 a header (labels: end of images,
/// end of identity records), images 1..=n, identity records after.
fn face_set(dir: &Path, labels: &[u32], with_header: bool) {
    let n = labels.len() as u64;
    let ids = labels.iter().max().map_or(0, |m| m + 1) as u64;
    let mut w = RecordWriter::create(&dir.join("train.rec"), Some(&dir.join("train.idx"))).unwrap();
    let first = if with_header {
        let h = ImageHeader { flag: 2, labels: vec![(n + 1) as f32, (n + 1 + ids) as f32], id: 0, id2: 0 };
        w.write(0, &pack(&h, b"")).unwrap();
        1
    } else {
        0
    };
    for (i, &y) in labels.iter().enumerate() {
        let img = format!("image {i} of {y}");
        w.write(first + i as u64, &pack(&ImageHeader::new(y as f32, i as u64), img.as_bytes())).unwrap();
    }
    if with_header {
        for c in 0..ids {
            let h = ImageHeader { flag: 2, labels: vec![0.0, 1.0], id: c, id2: 0 };
            w.write(n + 1 + c, &pack(&h, b"")).unwrap();
        }
    }
    w.finish().unwrap();
    std::fs::write(dir.join("property"), format!("{ids},112,112\n")).unwrap();
}

#[test]
fn insightface_training_sets_read_as_mxfacedataset() {
    let labels: Vec<u32> = (0..23).map(|i| (i * 7 % 5) as u32).collect();
    for with_header in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        face_set(dir.path(), &labels, with_header);
        let set = FaceRecords::open(dir.path()).unwrap();
        // The identity records after the images are not images.
        assert_eq!(set.len(), labels.len(), "header {with_header}");
        assert_eq!(set.property(), Some((5, 112, 112)));
        for (i, &y) in labels.iter().enumerate() {
            let (label, img) = set.get(i).unwrap();
            assert_eq!((label, img.as_ref()), (y, format!("image {i} of {y}").as_bytes()));
        }
        assert!(set.get(labels.len()).is_err());
    }
}

#[test]
fn corrupt_files_and_indexes_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let recs = records(2);
    let (rec, _) = write(dir.path(), &recs);
    let good = std::fs::read(&rec).unwrap();
    let file_err = |r: Result<_, Error>, needle: &str, what: &str| match r {
        Err(e @ Error::File { .. }) => assert!(e.to_string().contains(needle), "{what}: {e}"),
        Err(e) => panic!("{what}: not a file error: {e:?}"),
        Ok(_) => panic!("{what}: accepted"),
    };
    let all = |p: &Path| -> Result<usize, Error> {
        let f = RecordFile::open(p)?;
        f.records().try_fold(0, |n, r| r.map(|_| n + 1))
    };
    let bad = dir.path().join("bad.rec");
    // A bad magic, a truncated part, a part flag out of order.
    let mut b = good.clone();
    b[0] ^= 1;
    std::fs::write(&bad, &b).unwrap();
    file_err(all(&bad), "magic", "bad magic");
    std::fs::write(&bad, &good[..good.len() - 5]).unwrap();
    file_err(all(&bad), "runs past the end", "truncated");
    std::fs::write(&bad, &good[..good.len() - good.len() % 8 - 3]).unwrap();
    assert!(all(&bad).is_err(), "cut mid-header");
    let mut b = frame(b"abcd");
    b[7] = 2 << 5; // flag 2 on a first part
    std::fs::write(&bad, &b).unwrap();
    file_err(all(&bad), "flag 2", "middle part first");
    let mut b = frame(&[b"abcd".as_slice(), &MAGIC.to_le_bytes(), b"efgh"].concat());
    let second = 8 + 4;
    b[second + 7] = 0; // the last part flagged 0 instead of 3
    std::fs::write(&bad, &b).unwrap();
    file_err(all(&bad), "flag 0", "whole part inside a record");
    // Indexes: past the end, inside a record, a repeated key, garbage.
    for (text, needle) in [
        (format!("0\t{}\n", good.len() + 8), "past the end"),
        ("0\t4\n".to_string(), ""),
        ("0\t0\n0\t16\n".to_string(), "twice"),
        ("zero\t0\n".to_string(), "is not `key<TAB>offset`"),
        ("0\n".to_string(), "is not `key<TAB>offset`"),
    ] {
        let bad_idx = dir.path().join("bad.idx");
        std::fs::write(&bad_idx, &text).unwrap();
        match IndexedRecords::open(&rec, &bad_idx) {
            Err(e) => assert!(e.to_string().contains(needle), "{text:?}: {e}"),
            // An offset inside a record opens; reading it is the error.
            Ok(ix) => file_err(ix.get(0).map(|r| r.len()), "magic", "offset inside a record"),
        }
    }
    // A face set whose record 0 promises more images than the index has,
    // and an image whose label is not a class.
    let d2 = tempfile::tempdir().unwrap();
    face_set(d2.path(), &[0, 1, 2], true);
    let text = std::fs::read_to_string(d2.path().join("train.idx")).unwrap();
    let cut: String = text.lines().filter(|l| !l.starts_with("2\t")).map(|l| format!("{l}\n")).collect();
    std::fs::write(d2.path().join("train.idx"), cut).unwrap();
    file_err(FaceRecords::open(d2.path()).map(|s| s.len()), "not in the index", "missing image record");
    let d3 = tempfile::tempdir().unwrap();
    let mut w = RecordWriter::create(&d3.path().join("train.rec"), Some(&d3.path().join("train.idx"))).unwrap();
    w.write(0, &pack(&ImageHeader::new(2.5, 0), b"x")).unwrap();
    w.finish().unwrap();
    let set = FaceRecords::open(d3.path()).unwrap();
    file_err(set.get(0).map(|r| r.0 as usize), "not a class index", "fractional label");
    std::fs::write(d3.path().join("property"), "a,b").unwrap();
    file_err(FaceRecords::open(d3.path()).map(|s| s.len()), "classes,height,width", "property");
}
