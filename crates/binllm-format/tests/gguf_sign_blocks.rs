//! The 1-bit GGUF block types against bytes worked out by hand from ggml's definitions
//! (`ggml-common.h` / `ggml-quants.c` of the llama.cpp that llama-cpp-python 0.3.36 vendors),
//! and the GGUF writer's files read back, with damaged ones refused by name.

use binllm_format::gguf::sign_blocks::{decode_signs, dequantize, encode_signs};
use binllm_format::gguf::{GgmlType, GgufFile, GgufWriter, MetaValue, SignBlockType};
use binllm_format::packed::{pack_signs, BlockScales};

/// Element `j` of the test row is +1 when `j % 3 == 0`, else -1.
fn every_third_positive(cols: usize) -> Vec<f32> {
    (0..cols)
        .map(|j| if j % 3 == 0 { 1.0 } else { -1.0 })
        .collect()
}

#[test]
fn q1_0_block_matches_hand_computed_bytes() {
    // f16(0.5) = 0x3800. Bits LSB first: elements 0..8 -> + - - + - - + - = bits 0, 3, 6 =
    // 0x49; elements 8..16 -> 9, 12, 15 = bits 1, 4, 7 = 0x92; 16..24 -> 18, 21 = 0x24; the
    // pattern repeats every 3 bytes over the 16 bytes of 128 signs.
    let bits = pack_signs(&every_third_positive(128), 1, 128);
    let bytes = encode_signs(SignBlockType::Q1_0, &bits, &[0.5], None, 1, 128).unwrap();
    let mut expected = vec![0x00, 0x38];
    expected.extend([0x49, 0x92, 0x24].iter().cycle().take(16));
    assert_eq!(bytes, expected);
    assert_eq!(bytes.len(), 18);

    let decoded = decode_signs(SignBlockType::Q1_0, &bytes, 1, 128).unwrap();
    assert_eq!(decoded.sign_bits, bits);
    assert_eq!(decoded.row_scale, vec![0.5]);
    let values = dequantize(SignBlockType::Q1_0, &bytes, 128).unwrap();
    let want: Vec<f32> = every_third_positive(128).iter().map(|s| s * 0.5).collect();
    assert_eq!(values, want);
}

#[test]
fn q2_0_block_matches_hand_computed_bytes() {
    // f16(2.0) = 0x4000. Two bits per element, element j at bits 2 (j % 4) of byte j / 4;
    // +d is code 2, -d code 0. Elements 0..4 = + - - + -> 2 | 2 << 6 = 0x82; 4..8 = - - + -
    // -> 2 << 4 = 0x20; 8..12 = - + - - -> 2 << 2 = 0x08; repeating every 3 bytes.
    let bits = pack_signs(&every_third_positive(64), 1, 64);
    let bytes = encode_signs(SignBlockType::Q2_0, &bits, &[2.0], None, 1, 64).unwrap();
    let mut expected = vec![0x00, 0x40];
    expected.extend([0x82, 0x20, 0x08].iter().cycle().take(16));
    assert_eq!(bytes, expected);

    let decoded = decode_signs(SignBlockType::Q2_0, &bytes, 1, 64).unwrap();
    assert_eq!(decoded.sign_bits, bits);
    assert_eq!(decoded.row_scale, vec![2.0]);
    // ggml's value mapping: (q - 1) d, so codes 1 and 3 are 0 and 2d.
    let mut zero_and_double = bytes.clone();
    zero_and_double[2] = 0b11_01_00_10;
    let values = dequantize(SignBlockType::Q2_0, &zero_and_double, 64).unwrap();
    assert_eq!(&values[..4], &[2.0, -2.0, 0.0, 4.0]);
    let err = decode_signs(SignBlockType::Q2_0, &zero_and_double, 1, 64).unwrap_err();
    assert!(format!("{err:#}").contains("neither +d"), "{err:#}");

    // Two blocks of one row with their own scales: a scale per 64 columns.
    let bits = pack_signs(&every_third_positive(128), 1, 128);
    let mut bytes = encode_signs(SignBlockType::Q2_0, &bits, &[2.0], None, 1, 128).unwrap();
    bytes[18..20].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
    let decoded = decode_signs(SignBlockType::Q2_0, &bytes, 1, 128).unwrap();
    assert_eq!(decoded.sign_bits, bits);
    let block_scales = decoded.block_scales.unwrap();
    assert_eq!(block_scales.block_cols, 64);
    assert_eq!(
        block_scales.row(0),
        [half::f16::from_f32(2.0), half::f16::from_f32(0.5)]
    );
}

#[test]
fn q4_0_as_signs_uses_codes_7_and_9() {
    // f16(1.0) = 0x3C00; byte i holds element i (low nibble) and 16 + i (high nibble).
    let bits = pack_signs(&every_third_positive(32), 1, 32);
    let bytes = encode_signs(SignBlockType::Q4_0, &bits, &[1.0], None, 1, 32).unwrap();
    assert_eq!(&bytes[..2], &[0x00, 0x3C]);
    // Element 0 is +, element 16 is -: 9 | 7 << 4 = 0x79. Element 1 -, 17 -: 0x77.
    assert_eq!(bytes[2], 0x79);
    assert_eq!(bytes[3], 0x77);
    let decoded = decode_signs(SignBlockType::Q4_0, &bytes, 1, 32).unwrap();
    assert_eq!(decoded.sign_bits, bits);
}

#[test]
fn tq2_0_block_decodes_to_signs() {
    // 64 bytes of codes, then f16 d. Element 32 l + m of the first 128 is bits 2 l of byte m.
    let mut block = vec![0u8; 66];
    block[0] = 0b00_00_00_10; // element 0: +d; elements 32, 64, 96: -d
    block[64..66].copy_from_slice(&half::f16::from_f32(0.25).to_le_bytes());
    let values = dequantize(SignBlockType::Tq2_0, &block, 256).unwrap();
    assert_eq!(values[0], 0.25);
    assert_eq!(values[32], -0.25);
    let decoded = decode_signs(SignBlockType::Tq2_0, &block, 1, 256).unwrap();
    assert_eq!(decoded.sign_bits[0] & 1, 1);
    assert_eq!(decoded.sign_bits[0] >> 1 & 1, 0);
    assert_eq!(decoded.row_scale, vec![0.25]);
}

#[test]
fn tq1_0_block_decodes_trits() {
    // A byte holds five trits as a fraction of 256: byte = ceil(value * 256 / 243) where
    // value = sum t_n 3^(4 - n). All trits 2 (+d): value 242 -> 255. All trits 0 (-d): 0.
    let mut block = vec![0u8; 54];
    block[..48].fill(255);
    // The last 4 bytes hold four trits each, shifted one place (value * 3): all 2 -> 240 ->
    // ceil(240 * 256 / 243) = 253.
    block[48..52].fill(253);
    block[52..54].copy_from_slice(&half::f16::from_f32(1.0).to_le_bytes());
    let values = dequantize(SignBlockType::Tq1_0, &block, 256).unwrap();
    assert!(values.iter().all(|&v| v == 1.0), "{values:?}");
    block[..52].fill(0);
    let values = dequantize(SignBlockType::Tq1_0, &block, 256).unwrap();
    assert!(values.iter().all(|&v| v == -1.0));
}

#[test]
fn varying_block_scales_read_as_block_scales_and_wrong_sizes_are_refused() {
    let bits = pack_signs(&every_third_positive(2 * 256), 2, 256);
    let mut bytes = encode_signs(SignBlockType::Q1_0, &bits, &[0.5, 2.0], None, 2, 256).unwrap();
    // Block 1 of row 0 (bytes 18..) gets its own scale: the tensor keeps a scale per block.
    bytes[18..20].copy_from_slice(&half::f16::from_f32(0.75).to_le_bytes());
    let decoded = decode_signs(SignBlockType::Q1_0, &bytes, 2, 256).unwrap();
    assert_eq!(decoded.sign_bits, bits);
    assert_eq!(decoded.row_scale, vec![1.0, 1.0]);
    let block_scales = decoded.block_scales.as_ref().unwrap();
    assert_eq!(
        (block_scales.block_cols, block_scales.blocks_per_row),
        (128, 2)
    );
    let as_f32: Vec<f32> = block_scales.scales.iter().map(|s| s.to_f32()).collect();
    assert_eq!(as_f32, [0.5, 0.75, 2.0, 2.0]);
    // The floats see the same weights: elements 128 and 256 are -1 (128 % 3 == 2,
    // 256 % 3 == 1).
    let values = dequantize(SignBlockType::Q1_0, &bytes, 512).unwrap();
    assert_eq!((values[0], values[128], values[256]), (0.5, -0.75, -2.0));
    // Written back with its block scales, the tensor is the same bytes.
    let again = encode_signs(
        SignBlockType::Q1_0,
        &decoded.sign_bits,
        &decoded.row_scale,
        Some(block_scales),
        2,
        256,
    )
    .unwrap();
    assert_eq!(again, bytes);
    // A scale per 64 columns (Q2_0's) cannot be written as Q1_0, whose blocks are 128.
    let per_64 = BlockScales::new(64, 256, vec![half::f16::ONE; 8]);
    let err = encode_signs(
        SignBlockType::Q1_0,
        &bits,
        &[1.0, 1.0],
        Some(&per_64),
        2,
        256,
    );
    assert!(
        format!("{:#}", err.unwrap_err()).contains("cannot be written as Q1_0"),
        "a scale per 64 columns written as Q1_0"
    );

    // One scale per row, every block alike: row scales, no block scales.
    let uniform = encode_signs(SignBlockType::Q1_0, &bits, &[0.5, 2.0], None, 2, 256).unwrap();
    let decoded = decode_signs(SignBlockType::Q1_0, &uniform, 2, 256).unwrap();
    assert_eq!(
        (decoded.row_scale, decoded.block_scales),
        (vec![0.5, 2.0], None)
    );

    let err = decode_signs(SignBlockType::Q1_0, &bytes[..30], 1, 256).unwrap_err();
    assert!(format!("{err:#}").contains("need 36 bytes"), "{err:#}");
    let err = decode_signs(SignBlockType::Q1_0, &bytes[..36], 2, 128 + 64).unwrap_err();
    assert!(format!("{err:#}").contains("not a whole number"), "{err:#}");
    assert!(encode_signs(SignBlockType::Q1_0, &bits, &[0.5], None, 1, 192).is_err());
}

#[test]
fn writer_output_reads_back_and_truncation_names_the_tensor() {
    let bits = pack_signs(&every_third_positive(2 * 128), 2, 128);
    let bytes = encode_signs(SignBlockType::Q1_0, &bits, &[0.5, -1.0], None, 2, 128).unwrap();
    let mut w = GgufWriter::new();
    w.set_str("general.architecture", "llama");
    w.set("answer", MetaValue::U32(42));
    let q1 = GgmlType::from_name("Q1_0").unwrap();
    w.add_tensor("blk.0.attn_q.weight", &[2, 128], q1, bytes.clone())
        .unwrap();
    w.add_tensor(
        "blk.0.attn_norm.weight",
        &[3],
        GgmlType::from_name("F32").unwrap(),
        [1f32, 2.0, 3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    )
    .unwrap();
    // A byte count that does not match the shape is refused when the tensor is added.
    let err = w
        .add_tensor("bad", &[2, 128], q1, bytes[..20].to_vec())
        .unwrap_err();
    assert!(format!("{err:#}").contains("'bad'"), "{err:#}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    w.write(&path).unwrap();
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.version, 3);
    assert_eq!(file.get("answer"), Some(&MetaValue::U32(42)));
    let info = file.tensor_info("blk.0.attn_q.weight").unwrap();
    assert_eq!((info.ggml_type.name, info.shape()), ("Q1_0", vec![2, 128]));
    assert_eq!(file.tensor_bytes(info).unwrap(), &bytes[..]);
    let floats = file.read_tensor(info).unwrap().to_f32_vec();
    // Row 1 starts at element 128, a -1, times its scale -1.
    assert_eq!((floats[0], floats[1], floats[128]), (0.5, -0.5, 1.0));

    // Cut into the Q1_0 tensor's data: the reader names the file and the tensor.
    let whole = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &whole[..whole.len() - 40]).unwrap();
    let err = format!("{:#}", GgufFile::open(&cut).unwrap_err());
    assert!(err.contains("cut.gguf"), "{err}");
    assert!(
        err.contains("blk.0.attn_norm.weight") || err.contains("blk.0.attn_q.weight"),
        "{err}"
    );
}
