//! The shared kernel suite: every kernel of every table this CPU runs, against a portable f64
//! reference. A table the CPU cannot run is named as skipped with the reason (so the x86 run, and
//! the qemu runs as Cortex-A72 and Cortex-A76, each say what they covered).

use super::*;

/// The tables this CPU runs; the others are printed as skipped, with why.
fn usable() -> Vec<Kernels> {
    let mut ok = Vec::new();
    for (name, k) in candidates() {
        match k {
            Ok(k) => {
                assert_eq!(k.name, name);
                ok.push(k)
            }
            Err(why) => eprintln!("kernels: skipped {name}: {why}"),
        }
    }
    eprintln!("kernels: testing {}", ok.iter().map(|k| k.name).collect::<Vec<_>>().join(", "));
    ok
}

#[test]
fn the_chosen_table_is_the_best_usable_one_and_portable_always_runs() {
    let ok = usable();
    assert_eq!(ok.first().map(|k| k.name), Some(kernels().name));
    assert!(ok.iter().any(|k| k.name == "portable"));
    #[cfg(target_arch = "aarch64")]
    {
        // every aarch64 CPU has NEON; the dot product table where the CPU reports it
        let want = if std::arch::is_aarch64_feature_detected!("dotprod") { "aarch64 neon+dotprod" } else { "aarch64 neon" };
        assert_eq!(kernels().name, want);
    }
    for k in &ok {
        assert!(k.f32_rows >= 1);
    }
}

fn data(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| (((i * 37 + seed * 11) % 101) as f32 - 50.0) / 30.0).collect()
}

/// |got - want| within the error bound of a `terms`-term f32 sum (`terms · ε · Σ|term|`, plus
/// a little for the final rounding): any summation order passes, a wrong product does not.
fn within_sum_bound(got: f32, want: f64, magnitude: f64, terms: usize) -> bool {
    (got as f64 - want).abs() <= (terms as f64 + 2.0) * f32::EPSILON as f64 * magnitude + 1e-7
}

#[test]
fn f32_block_matches_f64_for_every_row_count_size_bias_and_residual() {
    for kern in usable() {
        for rows in 1..=kern.f32_rows {
            for k in [1usize, 3, 4, 5, 8, 64, 131] {
                for cols in [1usize, 7, 16, 17, 31, 32] {
                    let a = data(rows * k, 1);
                    // a packed block: k rows of 32 (zero past cols, as PackedF32 packs)
                    let mut w = data(k * F32_NB, 2);
                    for row in w.chunks_exact_mut(F32_NB) {
                        row[cols..].iter_mut().for_each(|x| *x = 0.0);
                    }
                    let bias = data(F32_NB, 3);
                    let ldo = cols + 3;
                    let res = data(rows * ldo, 4);
                    for (with_bias, with_res) in [(false, false), (true, false), (false, true), (true, true)] {
                        let mut out = vec![f32::NAN; rows * ldo];
                        unsafe {
                            (kern.f32_block)(
                                rows,
                                a.as_ptr(),
                                k,
                                w.as_ptr(),
                                out.as_mut_ptr(),
                                ldo,
                                cols,
                                if with_bias { bias.as_ptr() } else { std::ptr::null() },
                                if with_res { res.as_ptr() } else { std::ptr::null() },
                            )
                        };
                        for r in 0..rows {
                            for j in 0..ldo {
                                let got = out[r * ldo + j];
                                if j >= cols {
                                    assert!(got.is_nan(), "{}: wrote past cols {cols} at ({r}, {j})", kern.name);
                                    continue;
                                }
                                let terms = (0..k).map(|kk| a[r * k + kk] as f64 * w[kk * F32_NB + j] as f64);
                                let extra = if with_bias { bias[j] as f64 } else { 0.0 } + if with_res { res[r * ldo + j] as f64 } else { 0.0 };
                                let want = terms.clone().sum::<f64>() + extra;
                                let mag = terms.map(f64::abs).sum::<f64>() + extra.abs();
                                assert!(
                                    within_sum_bound(got, want, mag, k + 2),
                                    "{}: rows {rows} k {k} cols {cols} bias {with_bias} res {with_res} at ({r}, {j}): {got} vs {want}",
                                    kern.name
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn w8_block_matches_f64_for_every_row_count() {
    for kern in usable() {
        for rows in 1..=W8_MAX_ROWS {
            for k in [1usize, 2, 3, 7, 64, 257] {
                let a = data(rows * k, 5);
                let w: Vec<i8> = (0..k * W8_NB).map(|i| ((i * 53 % 255) as i32 - 127) as i8).collect();
                let mut acc = vec![[f32::NAN; W8_NB]; rows];
                (kern.w8_block)(&a, rows, k, &w, &mut acc);
                for r in 0..rows {
                    for j in 0..W8_NB {
                        let terms = (0..k).map(|kk| a[r * k + kk] as f64 * w[kk * W8_NB + j] as f64);
                        let (want, mag) = (terms.clone().sum::<f64>(), terms.map(f64::abs).sum::<f64>());
                        assert!(within_sum_bound(acc[r][j], want, mag, k), "{}: rows {rows} k {k} at ({r}, {j}): {} vs {want}", kern.name, acc[r][j]);
                    }
                }
            }
        }
    }
}

#[test]
fn q8_block_is_the_exact_integer_product_for_every_row_count() {
    for kern in usable() {
        for rows in 1..=Q8_MAX_ROWS {
            for kp in [16usize, 32, 48, 528] {
                // the full int8 range on both sides, the extremes included
                let a: Vec<i8> = (0..rows * kp)
                    .map(|i| match i % 7 {
                        0 => -128,
                        1 => 127,
                        _ => ((i * 37 % 256) as i32 - 128) as i8,
                    })
                    .collect();
                let w: Vec<i8> = (0..kp * Q8_NB).map(|i| if i % 5 == 0 { -128 } else { ((i * 53 % 256) as i32 - 128) as i8 }).collect();
                let mut acc = vec![[i32::MIN; Q8_NB]; rows];
                (kern.q8_block)(&a, rows, kp, &w, &mut acc);
                for r in 0..rows {
                    for j in 0..Q8_NB {
                        // byte (g·16 + j)·4 + t is w[4g + t, j]
                        let want: i64 = (0..kp).map(|kk| a[r * kp + kk] as i64 * w[(kk / 4 * Q8_NB + j) * 4 + kk % 4] as i64).sum();
                        assert_eq!(acc[r][j] as i64, want, "{}: rows {rows} kp {kp} at ({r}, {j})", kern.name);
                    }
                }
            }
        }
    }
}

/// softmax(a b · scale) v · out_scale per slice in f64.
fn attention_reference(a: &[f32], b: &[f32], v: &[f32], (l, d, l2, dv): (usize, usize, usize, usize), scale: f64, out_scale: f64) -> Vec<f32> {
    let mut out = vec![0f32; l * dv];
    for i in 0..l {
        let s: Vec<f64> = (0..l2).map(|j| scale * (0..d).map(|k| a[i * d + k] as f64 * b[k * l2 + j] as f64).sum::<f64>()).collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let sum: f64 = e.iter().sum();
        for c in 0..dv {
            out[i * dv + c] = (out_scale * (0..l2).map(|j| e[j] / sum * v[j * dv + c] as f64).sum::<f64>()) as f32;
        }
    }
    out
}

#[test]
fn attention_slice_matches_f64_contiguous_and_strided() {
    for kern in usable() {
        for dims in [(1, 1, 1, 1), (5, 7, 9, 4), (50, 64, 50, 64), (17, 33, 65, 19), (3, 8, 70, 5)] {
            let (l, d, l2, dv) = dims;
            let (a, b, v) = (data(l * d, 1), data(d * l2, 2), data(l2 * dv, 3));
            let (scale, out_scale) = (0.35f32, 0.8f32);
            let want = attention_reference(&a, &b, &v, dims, scale as f64, out_scale as f64);
            // contiguous operands and result
            let mut got = vec![f32::NAN; l * dv];
            let m = |p: &[f32], rs: usize| Mat { ptr: p.as_ptr(), rs, cs: 1 };
            let o = Mat { ptr: got.as_mut_ptr(), rs: dv, cs: 1 };
            unsafe { (kern.attention)(m(&a, d), m(&b, l2), m(&v, dv), o, dims, (scale, out_scale), &mut Scratch::default()) };
            close(&got, &want, &format!("{} contiguous {dims:?}", kern.name));
            // the same operands stored transposed (column stride != 1), the result transposed too
            let t = |x: &[f32], rows: usize, cols: usize| -> Vec<f32> { (0..rows * cols).map(|i| x[(i % rows) * cols + i / rows]).collect() };
            let (at, bt, vt) = (t(&a, l, d), t(&b, d, l2), t(&v, l2, dv));
            let mut got_t = vec![f32::NAN; l * dv];
            let mt = |p: &[f32], rows: usize| Mat { ptr: p.as_ptr(), rs: 1, cs: rows };
            let o = Mat { ptr: got_t.as_mut_ptr(), rs: 1, cs: l };
            unsafe { (kern.attention)(mt(&at, l), mt(&bt, d), mt(&vt, l2), o, dims, (scale, out_scale), &mut Scratch::default()) };
            close(&t(&got_t, dv, l), &want, &format!("{} strided {dims:?}", kern.name));
        }
    }
}

#[test]
fn decoder_attention_matches_f64_with_scattered_keys_and_masks() {
    for kern in usable() {
        // (queries, head size, keys): one query (a decoding step), several (a prompt), head sizes
        // off the 16 lanes, a key count past the 16 lanes of the softmax
        for (s, d, t) in [(1, 1, 1), (1, 64, 30), (3, 8, 5), (2, 20, 37), (1, 33, 255)] {
            let rows = 4;
            // the keys and values of `rows` sequences x `t` positions, each position's row of d
            let (k, v) = (data(rows * t * d, 5), data(rows * t * d, 6));
            // key j of this sequence lives in row (j * 7 + 3) % rows: positions scattered over rows
            let keys: Vec<usize> = (0..t).map(|j| (((j * 7 + 3) % rows) * t + j) * d).collect();
            let q = data(s * d, 7);
            let scale = 0.125f32;
            for masked in [false, true] {
                // the first key is never masked, every third after it is (-inf), the rest get a bias
                let mask: Vec<f32> =
                    if masked { (0..s * t).map(|i| if i % t != 0 && i % 3 == 0 { f32::NEG_INFINITY } else { (i % 5) as f32 * 0.1 }).collect() } else { vec![] };
                let mut want = vec![0f32; s * d];
                for i in 0..s {
                    let sc: Vec<f64> = (0..t)
                        .map(|j| {
                            let m = if masked { mask[i * t + j] as f64 } else { 0.0 };
                            scale as f64 * (0..d).map(|c| q[i * d + c] as f64 * k[keys[j] + c] as f64).sum::<f64>() + m
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for c in 0..d {
                        want[i * d + c] = ((0..t).map(|j| e[j] * v[keys[j] + c] as f64).sum::<f64>() / sum) as f32;
                    }
                }
                let mut got = vec![f32::NAN; s * d];
                (kern.decoder_attention)(&q, d, &k, &v, &keys, &mask, scale, &mut got, &mut Vec::new());
                close(&got, &want, &format!("{} decoder attention {s}x{d} over {t} keys, masked {masked}", kern.name));
            }
        }
    }
}

fn close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{what} at {i}: {g} vs {w}");
    }
}

#[test]
fn layer_norm_matches_f64_along_rows_and_middle_axes() {
    for kern in usable() {
        for (outer, n, inner) in [(1usize, 1usize, 1usize), (3, 50, 1), (2, 768, 1), (2, 17, 50), (1, 64, 7)] {
            let x: Vec<f32> = data(outer * n * inner, 6).iter().map(|v| v * 3.0 + 1.5).collect();
            let (scale, bias) = (data(n, 7), data(n, 8));
            let eps = 1e-5f32;
            let mut y = vec![f32::NAN; x.len()];
            (kern.layer_norm)(&x, &mut y, n, inner, &scale, &bias, eps);
            for o in 0..outer {
                for c in 0..inner {
                    let at = |i: usize| (o * n + i) * inner + c;
                    let mean = (0..n).map(|i| x[at(i)] as f64).sum::<f64>() / n as f64;
                    let var = (0..n).map(|i| (x[at(i)] as f64 - mean).powi(2)).sum::<f64>() / n as f64;
                    for i in 0..n {
                        let want = (x[at(i)] as f64 - mean) / (var + eps as f64).sqrt() * scale[i] as f64 + bias[i] as f64;
                        let got = y[at(i)] as f64;
                        assert!((got - want).abs() <= 2e-5 * (1.0 + want.abs()), "{}: {outer}x{n}x{inner} at ({o}, {i}, {c}): {got} vs {want}", kern.name);
                    }
                }
            }
        }
    }
}

#[test]
fn quantize_rounds_half_to_even_saturates_and_maps_nan_low() {
    for kern in usable() {
        let xs = [0.5f32, 1.5, 2.5, -0.5, -1.5, 300.0, -300.0, f32::NAN, 0.49, 126.6];
        let mut ys = [0i8; 10];
        (kern.quantize_i8)(&xs, &mut ys, 1.0, 0);
        assert_eq!(ys, [0, 2, 2, 0, -2, 127, -128, -128, 0, 127], "{}", kern.name);
        (kern.quantize_i8)(&[1.0, -200.0], &mut ys[..2], 10.0, -3);
        assert_eq!(&ys[..2], &[7, -128], "{}", kern.name);
        // a long run (the vectorised loop and its remainder) against the scalar definition
        let xs: Vec<f32> = data(1000, 9).iter().map(|v| v * 80.0).collect();
        let mut ys = vec![0i8; xs.len()];
        (kern.quantize_i8)(&xs, &mut ys, 1.3, 5);
        for (x, y) in xs.iter().zip(&ys) {
            let want = (((*x * 1.3f32) as f64).round_ties_even() + 5.0).clamp(-128.0, 127.0) as i8;
            assert_eq!(*y, want, "{}: {x}", kern.name);
        }
    }
}

#[test]
fn exp_is_close_to_std() {
    use super::portable::exp;
    let mut worst = 0f64;
    let mut x = -87.0f32;
    while x <= 0.0 {
        let (got, want) = (exp(x) as f64, (x as f64).exp());
        worst = worst.max((got - want).abs() / want);
        x += 0.0037;
    }
    assert!(worst < 3e-7, "relative error {worst}");
    assert_eq!(exp(0.0), 1.0);
    assert_eq!(exp(-100.0), 0.0);
    assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    assert!(exp(f32::NAN).is_nan());
}

#[test]
fn softmax_sums_to_one_and_survives_large_logits() {
    let p = softmax(&[1000.0, 999.0, -1000.0]);
    let e = (-1f64).exp();
    assert!((p[0] as f64 - 1.0 / (1.0 + e)).abs() < 1e-6 && (p[1] as f64 - e / (1.0 + e)).abs() < 1e-6 && p[2] == 0.0, "{p:?}");
    let p = softmax(&data(77, 3));
    assert!((p.iter().map(|&x| x as f64).sum::<f64>() - 1.0).abs() < 1e-5);
}

/// Operands without contiguous rows are copied in either loop order, whichever stride is the
/// unit one (the AVX-512 attention's operand copy).
#[cfg(target_arch = "x86_64")]
#[test]
fn strided_operands_copy_to_contiguous_rows() {
    let src: Vec<f32> = (0..7 * 5).map(|i| i as f32).collect();
    // [7, 5] read as its transpose [5, 7] (rows stride 1, columns stride 5), and every other
    // row of [7, 5] with every other column (rows stride 10, columns stride 2)
    for (m, rows, cols) in [(Mat { ptr: src.as_ptr(), rs: 1, cs: 5 }, 5, 7), (Mat { ptr: src.as_ptr(), rs: 10, cs: 2 }, 4, 3)] {
        let mut buf = Vec::new();
        let (p, ld) = unsafe { super::x86_64::contiguous_rows(m, rows, cols, &mut buf) };
        assert_eq!(ld, cols);
        for i in 0..rows {
            for j in 0..cols {
                assert_eq!(unsafe { *p.add(i * ld + j) }, src[i * m.rs + j * m.cs], "({i}, {j})");
            }
        }
    }
}
