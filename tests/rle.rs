//! COCO RLE strings equal pycocotools' for the same masks (golden strings made by pycocotools).

use tinysam_edge::postprocess::Rle;

use crate::util::{cases, fixtures};

#[test]
fn rle_strings_match_pycocotools() {
    let c = cases();
    let list = c["rle"].as_array().unwrap();
    assert!(!list.is_empty());
    for case in list {
        let png = fixtures()
            .join("golden")
            .join(case["png"].as_str().unwrap());
        let img = image::open(&png).unwrap().to_luma8();
        let mask: Vec<u8> = img.as_raw().iter().map(|&v| u8::from(v > 127)).collect();
        let rle = Rle::encode(&mask, img.width(), img.height());
        assert_eq!(
            rle.to_compressed(),
            case["counts"].as_str().unwrap(),
            "{}",
            png.display()
        );
        assert_eq!(rle.area(), case["area"].as_u64().unwrap());
        let back =
            Rle::from_compressed(case["counts"].as_str().unwrap(), img.width(), img.height())
                .unwrap();
        assert_eq!(back.decode().unwrap(), mask);
    }
}
