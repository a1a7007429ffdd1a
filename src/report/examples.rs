//! A PNG grid of adversarial examples: one column per image; rows: the clean image, the
//! perturbation magnified to the full range (grey = 0, white = +ε, black = −ε), and the
//! adversarial image. Each image is scaled ×3 and framed green when the model classifies it
//! correctly, red when not; under the clean and adversarial rows, the label (clean row) and
//! the prediction are written as class indices (0-9, CIFAR-10 order) in a 3×5 pixel font.

use std::path::Path;

use candle_core::DType;
use image::{Rgb, RgbImage};

use crate::eval::robust::Examples;
use crate::{Error, Result};

const SCALE: u32 = 3;
const CELL: u32 = 32 * SCALE + 8;
const TEXT: u32 = 14;

/// 3×5 glyphs of the digits 0-9, rows top to bottom, 3 bits each (MSB = left).
const DIGITS: [[u8; 5]; 10] = [
    [7, 5, 5, 5, 7],
    [2, 6, 2, 2, 7],
    [7, 1, 7, 4, 7],
    [7, 1, 7, 1, 7],
    [5, 5, 7, 1, 1],
    [7, 4, 7, 1, 7],
    [7, 4, 7, 5, 7],
    [7, 1, 1, 1, 1],
    [7, 5, 7, 5, 7],
    [7, 5, 7, 1, 7],
];

fn digit(img: &mut RgbImage, x0: u32, y0: u32, d: u32, color: Rgb<u8>) {
    for (r, bits) in DIGITS[(d % 10) as usize].iter().enumerate() {
        for c in 0..3u32 {
            if bits & (4 >> c) != 0 {
                for dy in 0..2 {
                    for dx in 0..2 {
                        img.put_pixel(x0 + c * 2 + dx, y0 + r as u32 * 2 + dy, color);
                    }
                }
            }
        }
    }
}

fn put_image(img: &mut RgbImage, x0: u32, y0: u32, chw: &[f32], frame: Rgb<u8>) {
    for y in 0..CELL - 4 {
        for x in 0..CELL - 4 {
            let edge = x < 2 || y < 2 || x >= CELL - 6 || y >= CELL - 6;
            if edge {
                img.put_pixel(x0 + x, y0 + y, frame);
            }
        }
    }
    for y in 0..32 * SCALE {
        for x in 0..32 * SCALE {
            let p = ((y / SCALE) * 32 + x / SCALE) as usize;
            let px = |c: usize| (chw[c * 1024 + p].clamp(0.0, 1.0) * 255.0).round() as u8;
            img.put_pixel(x0 + 2 + x, y0 + 2 + y, Rgb([px(0), px(1), px(2)]));
        }
    }
}

/// Writes the grid of `ex` (attacked at radius `eps`) as a PNG.
pub fn write_grid(path: &Path, ex: &Examples, eps: f64) -> Result<()> {
    let (x, x_adv) = (&ex.x, &ex.x_adv);
    let (labels, clean_pred, adv_pred) = (&ex.labels, &ex.clean_pred, &ex.adv_pred);
    let b = x.dim(0)?;
    let xs = x.to_dtype(DType::F32)?.flatten_from(1)?.to_vec2::<f32>()?;
    let advs = x_adv
        .to_dtype(DType::F32)?
        .flatten_from(1)?
        .to_vec2::<f32>()?;
    let (w, h) = (CELL * b as u32, 3 * CELL + 2 * TEXT);
    let mut img = RgbImage::from_pixel(w.max(1), h, Rgb([255, 255, 255]));
    let (green, red, grey, black) = (
        Rgb([0, 160, 0]),
        Rgb([200, 0, 0]),
        Rgb([128, 128, 128]),
        Rgb([0, 0, 0]),
    );
    for i in 0..b {
        let x0 = i as u32 * CELL + 2;
        let ok = |p: u32| if p == labels[i] { green } else { red };
        put_image(&mut img, x0, 2, &xs[i], ok(clean_pred[i]));
        digit(&mut img, x0 + 4, CELL, labels[i], black);
        digit(&mut img, x0 + 16, CELL, clean_pred[i], ok(clean_pred[i]));
        let scale = if eps > 0.0 { 0.5 / eps as f32 } else { 0.0 };
        let delta: Vec<f32> = advs[i]
            .iter()
            .zip(&xs[i])
            .map(|(a, c)| 0.5 + (a - c) * scale)
            .collect();
        put_image(&mut img, x0, CELL + TEXT, &delta, grey);
        put_image(&mut img, x0, 2 * CELL + TEXT, &advs[i], ok(adv_pred[i]));
        digit(
            &mut img,
            x0 + 16,
            3 * CELL + TEXT,
            adv_pred[i],
            ok(adv_pred[i]),
        );
    }
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::io(path, std::io::Error::other(e.to_string())))?;
    crate::io::write_bytes_atomic(path, &bytes)
}
