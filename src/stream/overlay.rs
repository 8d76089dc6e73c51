//! Annotated frames: the top labels with their probabilities, the latest caption and the frame
//! rate, drawn with embedded-graphics on the RGB frame, then JPEG-encoded for `--save` and the
//! live preview, at the frame's own size (the preview page scales small frames up; enlarging
//! here would make every JPEG several times dearer).

use embedded_graphics::mono_font::ascii::{FONT_10X20, FONT_6X10, FONT_9X15};
use embedded_graphics::mono_font::{MonoFont, MonoTextStyle};
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::*;
use embedded_graphics::text::{Baseline, Text};

use super::FrameReport;
use crate::error::Result;
use crate::vision::DecodedImage;

/// Label text colour (also what tests look for in a screenshot).
pub const LABEL_RGB: [u8; 3] = [80, 255, 120];
pub const LABEL_COLOR: Rgb888 = Rgb888::new(LABEL_RGB[0], LABEL_RGB[1], LABEL_RGB[2]);
pub const CAPTION_COLOR: Rgb888 = Rgb888::new(255, 255, 255);
pub const FPS_COLOR: Rgb888 = Rgb888::new(255, 220, 0);
pub const HEAD_COLOR: Rgb888 = Rgb888::new(120, 200, 255);

/// An RGB8 frame being annotated.
pub struct Annotated {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

struct Canvas<'a> {
    w: u32,
    h: u32,
    px: &'a mut [u8],
}

impl OriginDimensions for Canvas<'_> {
    fn size(&self) -> Size {
        Size::new(self.w, self.h)
    }
}

impl DrawTarget for Canvas<'_> {
    type Color = Rgb888;
    type Error = core::convert::Infallible;
    fn draw_iter<I: IntoIterator<Item = Pixel<Rgb888>>>(&mut self, pixels: I) -> Result<(), Self::Error> {
        for Pixel(p, c) in pixels {
            if p.x >= 0 && p.y >= 0 && (p.x as u32) < self.w && (p.y as u32) < self.h {
                let i = (p.y as usize * self.w as usize + p.x as usize) * 3;
                self.px[i] = c.r();
                self.px[i + 1] = c.g();
                self.px[i + 2] = c.b();
            }
        }
        Ok(())
    }
}

impl Canvas<'_> {
    /// Darken rows `y0..y1` (a banner behind text).
    fn shade(&mut self, y0: u32, y1: u32) {
        let (a, b) = (y0.min(self.h) as usize * self.w as usize * 3, y1.min(self.h) as usize * self.w as usize * 3);
        self.px[a..b].iter_mut().for_each(|v| *v = (*v as u16 * 2 / 5) as u8);
    }
    fn text(&mut self, s: &str, x: i32, y: i32, font: &MonoFont, color: Rgb888) {
        let style = MonoTextStyle::new(font, color);
        let _ = Text::with_baseline(s, Point::new(x, y), style, Baseline::Top).draw(self);
    }
}

fn font_for(width: u32) -> &'static MonoFont<'static> {
    match width {
        w if w >= 800 => &FONT_10X20,
        w if w >= 480 => &FONT_9X15,
        _ => &FONT_6X10,
    }
}

/// Split `s` into lines of at most `cols` characters at spaces.
fn wrap(s: &str, cols: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in s.split_whitespace() {
        let last = lines.last_mut().unwrap();
        if !last.is_empty() && last.chars().count() + 1 + word.chars().count() > cols {
            lines.push(String::new());
        }
        let last = lines.last_mut().unwrap();
        if !last.is_empty() {
            last.push(' ');
        }
        last.push_str(word);
    }
    lines.retain(|l| !l.is_empty());
    lines
}

/// Draw `report`'s labels, `caption` (the latest one, which may be older than this frame) and
/// `fps` on `image`.
pub fn annotate(image: &DecodedImage, report: &FrameReport, caption: Option<&str>, fps: Option<f64>) -> Annotated {
    let (w, h) = (image.width(), image.height());
    let mut rgb = image.to_rgb8();
    let font = font_for(w);
    let (cw, ch) = (font.character_size.width as i32, font.character_size.height as i32 + 2);
    let mut c = Canvas { w, h, px: &mut rgb };
    let pad = 4;
    // zero-shot labels in green, then the head's classes in blue
    let head = report.head.as_deref().unwrap_or(&[]);
    let lines: Vec<(String, Rgb888)> = report
        .labels
        .iter()
        .map(|l| (format!("{:>3.0}% {}", l.p * 100.0, l.label), LABEL_COLOR))
        .chain(head.iter().map(|l| (format!("{:>3.0}% {} (head)", l.p * 100.0, l.label), HEAD_COLOR)))
        .collect();
    if !lines.is_empty() {
        c.shade(0, (lines.len() as i32 * ch + 2 * pad) as u32);
        for (i, (line, color)) in lines.iter().enumerate() {
            c.text(line, pad, pad + i as i32 * ch, font, *color);
        }
    }
    if let Some(fps) = fps {
        let s = format!("{fps:.1} fps");
        c.text(&s, w as i32 - pad - cw * s.len() as i32, pad, font, FPS_COLOR);
    }
    if let Some(text) = caption {
        let cols = ((w as i32 - 2 * pad) / cw).max(8) as usize;
        let lines = wrap(text, cols);
        let top = h as i32 - lines.len() as i32 * ch - 2 * pad;
        c.shade(top.max(0) as u32, h);
        for (i, l) in lines.iter().enumerate() {
            c.text(l, pad, top + pad + i as i32 * ch, font, CAPTION_COLOR);
        }
    }
    Annotated { width: w, height: h, rgb }
}

impl Annotated {
    /// Baseline JPEG at `quality` (1..=100).
    pub fn to_jpeg(&self, quality: u8) -> Result<Vec<u8>> {
        crate::vision::encode_jpeg(&self.rgb, self.width, self.height, quality)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::{Counters, LabelScore, Latency};

    fn report() -> FrameReport {
        FrameReport {
            schema: 2,
            frame: 0,
            t_ms: 0.0,
            labels: vec![LabelScore { label: "red circle".into(), p: 0.9 }],
            head: None,
            caption: None,
            latency: Latency::default(),
            counters: Counters { captured: 1, processed: 1, ..Default::default() },
        }
    }

    #[test]
    fn draws_labels_caption_and_fps_and_encodes() {
        let img = DecodedImage::from_rgb8(320, 240, vec![128; 320 * 240 * 3]).unwrap();
        let a = annotate(&img, &report(), Some("a large red circle on the left with a very long tail of words"), Some(12.5));
        assert_eq!((a.width, a.height), (320, 240));
        let has = |c: Rgb888| a.rgb.chunks_exact(3).any(|p| p == [c.r(), c.g(), c.b()]);
        assert!(has(LABEL_COLOR) && has(CAPTION_COLOR) && has(FPS_COLOR));
        // banners are shaded, the middle is untouched
        let mid = ((120 * 320 + 160) * 3) as usize;
        assert_eq!(&a.rgb[mid..mid + 3], &[128, 128, 128]);
        let jpeg = a.to_jpeg(85).unwrap();
        let back = crate::vision::decode_image(&jpeg, "overlay", &Default::default()).unwrap();
        assert_eq!((back.width(), back.height()), (320, 240));
    }

    #[test]
    fn wraps_at_spaces() {
        assert_eq!(wrap("a bb ccc dddd", 6), vec!["a bb", "ccc", "dddd"]);
        assert_eq!(wrap("", 6), Vec::<String>::new());
    }
}
