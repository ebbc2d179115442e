//! Prompts in frame pixels: validation and the transform to the decoder's model space.
//!
//! A prompt is foreground/background points, an optional box and an optional low-res mask from an
//! earlier prediction. Everything a client sends is checked here before it reaches the model.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::geometry::Geometry;

/// Most points one prompt may carry (a box counts as two).
pub const MAX_POINTS: usize = 32;

/// The one rule for a prompt's size, used by the CLI, the library and the wire protocol: its
/// points plus two for a box (the decoder takes a box as its two corners) are at most
/// [`MAX_POINTS`]. Returns that count.
pub fn check_point_count(points: usize, has_box: bool) -> Result<usize, PromptError> {
    let count = points.saturating_add(if has_box { 2 } else { 0 });
    if count > MAX_POINTS {
        return Err(PromptError::TooManyPoints {
            count,
            max: MAX_POINTS,
        });
    }
    Ok(count)
}

/// Why a prompt was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PromptError {
    /// No point and no box.
    #[error("prompt has no point and no box")]
    Empty,
    /// A coordinate is NaN or infinite.
    #[error("{what} has a non-finite coordinate")]
    NotFinite {
        /// "point 3" or "box".
        what: String,
    },
    /// A point lies outside the frame.
    #[error("point {index} ({x}, {y}) is outside the {width}x{height} image")]
    PointOutside {
        /// Index of the point in the prompt.
        index: usize,
        /// Its x.
        x: f32,
        /// Its y.
        y: f32,
        /// Frame width.
        width: u32,
        /// Frame height.
        height: u32,
    },
    /// A box with no area inside the frame.
    #[error("box ({x0}, {y0}, {x1}, {y1}) is empty inside the {width}x{height} image")]
    EmptyBox {
        /// Left.
        x0: f32,
        /// Top.
        y0: f32,
        /// Right.
        x1: f32,
        /// Bottom.
        y1: f32,
        /// Frame width.
        width: u32,
        /// Frame height.
        height: u32,
    },
    /// A box whose corners are not top-left then bottom-right.
    #[error(
        "box ({x0}, {y0}, {x1}, {y1}) is reversed: give the top-left corner, then the \
         bottom-right (x0 <= x1, y0 <= y1)"
    )]
    ReversedBox {
        /// Left.
        x0: f32,
        /// Top.
        y0: f32,
        /// Right.
        x1: f32,
        /// Bottom.
        y1: f32,
    },
    /// More points than [`MAX_POINTS`].
    #[error("prompt has {count} points, at most {max} are allowed")]
    TooManyPoints {
        /// Points given (a box counts as two).
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A mask input of the wrong size.
    #[error("mask input has {got} values, the model takes {expected}")]
    MaskInputSize {
        /// Values given.
        got: usize,
        /// m*m.
        expected: usize,
    },
    /// Text that does not parse as a point or box.
    #[error("cannot parse {text:?} as {expected}")]
    Parse {
        /// The text.
        text: String,
        /// What it should look like.
        expected: &'static str,
    },
}

/// Foreground or background.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PointLabel {
    /// Part of the object.
    Foreground,
    /// Not part of the object.
    Background,
}

impl PointLabel {
    /// SAM's numeric label.
    pub fn model_label(self) -> f32 {
        match self {
            PointLabel::Foreground => 1.0,
            PointLabel::Background => 0.0,
        }
    }
}

/// A point in frame pixels.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PromptPoint {
    /// Column, 0..width.
    pub x: f32,
    /// Row, 0..height.
    pub y: f32,
    /// Foreground or background.
    pub label: PointLabel,
}

impl FromStr for PromptPoint {
    type Err = PromptError;

    /// `x,y` (foreground) or `x,y,1` / `x,y,0`.
    fn from_str(s: &str) -> Result<Self, PromptError> {
        let err = || PromptError::Parse {
            text: s.to_string(),
            expected: "x,y[,label] with label 1 or 0",
        };
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        let num = |t: &str| t.parse::<f32>().map_err(|_| err());
        match parts.as_slice() {
            [x, y] => Ok(PromptPoint {
                x: num(x)?,
                y: num(y)?,
                label: PointLabel::Foreground,
            }),
            [x, y, l] => {
                let label = match *l {
                    "1" => PointLabel::Foreground,
                    "0" => PointLabel::Background,
                    _ => return Err(err()),
                };
                Ok(PromptPoint {
                    x: num(x)?,
                    y: num(y)?,
                    label,
                })
            }
            _ => Err(err()),
        }
    }
}

/// An axis-aligned box in frame pixels.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BoxPrompt {
    /// Left.
    pub x0: f32,
    /// Top.
    pub y0: f32,
    /// Right.
    pub x1: f32,
    /// Bottom.
    pub y1: f32,
}

impl std::fmt::Display for PromptPoint {
    /// `x,y,label`, as [`PromptPoint::from_str`] reads it back (exactly: f32 prints round-trip).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let label = u8::from(self.label == PointLabel::Foreground);
        write!(f, "{},{},{label}", self.x, self.y)
    }
}

impl std::fmt::Display for BoxPrompt {
    /// `x0,y0,x1,y1`, as [`BoxPrompt::from_str`] reads it back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{},{},{},{}", self.x0, self.y0, self.x1, self.y1)
    }
}

impl FromStr for BoxPrompt {
    type Err = PromptError;

    /// `x0,y0,x1,y1`.
    fn from_str(s: &str) -> Result<Self, PromptError> {
        let err = || PromptError::Parse {
            text: s.to_string(),
            expected: "x0,y0,x1,y1",
        };
        let v: Vec<f32> = s
            .split(',')
            .map(|t| t.trim().parse::<f32>().map_err(|_| err()))
            .collect::<Result<_, _>>()?;
        match v.as_slice() {
            [x0, y0, x1, y1] => Ok(BoxPrompt {
                x0: *x0,
                y0: *y0,
                x1: *x1,
                y1: *y1,
            }),
            _ => Err(err()),
        }
    }
}

/// One prompt: points, an optional box, an optional low-res mask to refine.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Prompt {
    /// Points in frame pixels.
    pub points: Vec<PromptPoint>,
    /// Box in frame pixels.
    pub bbox: Option<BoxPrompt>,
    /// m*m low-res logits from an earlier prediction of the same object.
    pub mask_input: Option<Vec<f32>>,
}

/// A validated prompt in the decoder's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelPrompt {
    /// (x, y) in model-input pixels.
    pub coords: Vec<[f32; 2]>,
    /// SAM labels, including the padding point (-1) SAM adds when there is no box.
    pub labels: Vec<f32>,
}

impl Prompt {
    /// A single foreground point.
    pub fn point(x: f32, y: f32) -> Prompt {
        Prompt {
            points: vec![PromptPoint {
                x,
                y,
                label: PointLabel::Foreground,
            }],
            ..Prompt::default()
        }
    }

    /// Points a prompt takes in the decoder (a box is two, and SAM pads boxless prompts by one).
    pub fn model_point_count(&self) -> usize {
        self.points.len() + if self.bbox.is_some() { 2 } else { 1 }
    }

    /// Check the prompt against a frame and convert it to model space.
    ///
    /// Points must lie inside the frame; a box is clipped to the frame and must keep an area.
    pub fn to_model(
        &self,
        geometry: &Geometry,
        mask_values: usize,
    ) -> Result<ModelPrompt, PromptError> {
        if self.points.is_empty() && self.bbox.is_none() {
            return Err(PromptError::Empty);
        }
        let count = check_point_count(self.points.len(), self.bbox.is_some())?;
        if let Some(mask) = &self.mask_input {
            if mask.len() != mask_values {
                return Err(PromptError::MaskInputSize {
                    got: mask.len(),
                    expected: mask_values,
                });
            }
        }
        let (w, h) = (geometry.frame_width as f32, geometry.frame_height as f32);
        let mut coords = Vec::with_capacity(count + 1);
        let mut labels = Vec::with_capacity(count + 1);
        for (index, p) in self.points.iter().enumerate() {
            if !(p.x.is_finite() && p.y.is_finite()) {
                return Err(PromptError::NotFinite {
                    what: format!("point {index}"),
                });
            }
            if p.x < 0.0 || p.y < 0.0 || p.x > w || p.y > h {
                return Err(PromptError::PointOutside {
                    index,
                    x: p.x,
                    y: p.y,
                    width: geometry.frame_width,
                    height: geometry.frame_height,
                });
            }
            let (mx, my) = geometry.frame_to_model(p.x, p.y);
            coords.push([mx, my]);
            labels.push(p.label.model_label());
        }
        match self.bbox {
            Some(b) => {
                if ![b.x0, b.y0, b.x1, b.y1].iter().all(|v| v.is_finite()) {
                    return Err(PromptError::NotFinite { what: "box".into() });
                }
                if b.x1 < b.x0 || b.y1 < b.y0 {
                    return Err(PromptError::ReversedBox {
                        x0: b.x0,
                        y0: b.y0,
                        x1: b.x1,
                        y1: b.y1,
                    });
                }
                let (x0, x1) = (b.x0.clamp(0.0, w), b.x1.clamp(0.0, w));
                let (y0, y1) = (b.y0.clamp(0.0, h), b.y1.clamp(0.0, h));
                if x1 - x0 < 1.0 || y1 - y0 < 1.0 {
                    return Err(PromptError::EmptyBox {
                        x0: b.x0,
                        y0: b.y0,
                        x1: b.x1,
                        y1: b.y1,
                        width: geometry.frame_width,
                        height: geometry.frame_height,
                    });
                }
                let (ax, ay) = geometry.frame_to_model(x0, y0);
                let (bx, by) = geometry.frame_to_model(x1, y1);
                coords.push([ax, ay]);
                coords.push([bx, by]);
                labels.extend([2.0, 3.0]);
            }
            None => {
                coords.push([0.0, 0.0]);
                labels.push(-1.0);
            }
        }
        Ok(ModelPrompt { coords, labels })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn geom() -> Geometry {
        Geometry::new(640, 480, 1024).unwrap()
    }

    #[test]
    fn point_gets_sam_padding() {
        let m = Prompt::point(320.0, 240.0)
            .to_model(&geom(), 65536)
            .unwrap();
        assert_eq!(m.coords, vec![[512.0, 384.0], [0.0, 0.0]]);
        assert_eq!(m.labels, vec![1.0, -1.0]);
    }

    #[test]
    fn box_is_two_corners_and_clipped() {
        let p = Prompt {
            bbox: Some(BoxPrompt {
                x0: -10.0,
                y0: 10.0,
                x1: 320.0,
                y1: 500.0,
            }),
            ..Prompt::default()
        };
        let m = p.to_model(&geom(), 65536).unwrap();
        assert_eq!(m.labels, vec![2.0, 3.0]);
        assert_eq!(m.coords, vec![[0.0, 16.0], [512.0, 768.0]]);
    }

    #[test]
    fn bad_prompts_are_refused() {
        let g = geom();
        assert_eq!(Prompt::default().to_model(&g, 1), Err(PromptError::Empty));
        assert!(matches!(
            Prompt::point(641.0, 0.0).to_model(&g, 1),
            Err(PromptError::PointOutside { index: 0, .. })
        ));
        assert!(matches!(
            Prompt::point(f32::NAN, 0.0).to_model(&g, 1),
            Err(PromptError::NotFinite { .. })
        ));
        let empty = Prompt {
            bbox: Some(BoxPrompt {
                x0: 5.0,
                y0: 5.0,
                x1: 5.0,
                y1: 50.0,
            }),
            ..Prompt::default()
        };
        assert!(matches!(
            empty.to_model(&g, 1),
            Err(PromptError::EmptyBox { .. })
        ));
        let outside = Prompt {
            bbox: Some(BoxPrompt {
                x0: 700.0,
                y0: 5.0,
                x1: 900.0,
                y1: 50.0,
            }),
            ..Prompt::default()
        };
        assert!(matches!(
            outside.to_model(&g, 1),
            Err(PromptError::EmptyBox { .. })
        ));
        let reversed = Prompt {
            bbox: Some(BoxPrompt {
                x0: 300.0,
                y0: 5.0,
                x1: 100.0,
                y1: 50.0,
            }),
            ..Prompt::default()
        };
        assert!(matches!(
            reversed.to_model(&g, 1),
            Err(PromptError::ReversedBox { .. })
        ));
        let many = Prompt {
            points: vec![Prompt::point(1.0, 1.0).points[0]; MAX_POINTS + 1],
            ..Prompt::default()
        };
        assert!(matches!(
            many.to_model(&g, 1),
            Err(PromptError::TooManyPoints { .. })
        ));
        // One rule everywhere: a box counts as two points.
        let corners = |points| Prompt {
            points: vec![Prompt::point(1.0, 1.0).points[0]; points],
            bbox: Some(BoxPrompt {
                x0: 1.0,
                y0: 1.0,
                x1: 50.0,
                y1: 50.0,
            }),
            ..Prompt::default()
        };
        assert!(corners(MAX_POINTS - 2).to_model(&g, 1).is_ok());
        assert!(matches!(
            corners(MAX_POINTS - 1).to_model(&g, 1),
            Err(PromptError::TooManyPoints { count: 33, .. })
        ));
        assert_eq!(
            check_point_count(MAX_POINTS - 2, true).ok(),
            Some(MAX_POINTS)
        );
        assert!(check_point_count(MAX_POINTS - 1, true).is_err());
        assert!(check_point_count(usize::MAX, true).is_err());
        let mask = Prompt {
            mask_input: Some(vec![0.0; 3]),
            ..Prompt::point(1.0, 1.0)
        };
        assert_eq!(
            mask.to_model(&g, 4),
            Err(PromptError::MaskInputSize {
                got: 3,
                expected: 4
            })
        );
    }

    #[test]
    fn parse_points_and_boxes() {
        assert_eq!(
            "3,4".parse::<PromptPoint>().unwrap().label,
            PointLabel::Foreground
        );
        assert_eq!(
            "3, 4, 0".parse::<PromptPoint>().unwrap().label,
            PointLabel::Background
        );
        assert!("3,4,2".parse::<PromptPoint>().is_err());
        assert!("x,4".parse::<PromptPoint>().is_err());
        assert_eq!("1,2,3,4".parse::<BoxPrompt>().unwrap().x1, 3.0);
        assert!("1,2,3".parse::<BoxPrompt>().is_err());
    }

    proptest! {
        #[test]
        fn points_inside_map_inside_the_resized_area(w in 1u32..4000, h in 1u32..4000, fx in 0f32..=1.0, fy in 0f32..=1.0) {
            let g = Geometry::new(w, h, 1024).unwrap();
            let m = Prompt::point(fx * w as f32, fy * h as f32).to_model(&g, 0).unwrap();
            let [x, y] = m.coords[0];
            prop_assert!(x >= 0.0 && x <= g.resized_width as f32 + 1e-3);
            prop_assert!(y >= 0.0 && y <= g.resized_height as f32 + 1e-3);
            let (bx, by) = g.model_to_frame(x, y);
            prop_assert!((bx - fx * w as f32).abs() <= 1e-2 * w as f32);
            prop_assert!((by - fy * h as f32).abs() <= 1e-2 * h as f32);
        }
    }
}
