//! The generation routes. Content generation is not keyledger's job: each handler validates
//! its request exactly, then returns a small deterministic placeholder resource. Auth,
//! permissions, entitlements, credits and the envelope around it are real.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};

use super::envelope::{Pending, body_code, parse_json};

/// Longest prompt, title, content or free-text field, in characters.
const MAX_TEXT: usize = 20_000;
/// Most context items per request.
const MAX_CONTEXT: usize = 20;
/// Longest quiz.
const MAX_QUIZ_LENGTH: u32 = 50;

/// One item of typed context a request may carry.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ContextItem {
    /// Inline text.
    Text {
        content: String,
        #[serde(default)]
        title: Option<String>,
    },
    /// An uploaded document, by id.
    Doc { id: String },
    /// An uploaded PDF, by id.
    Pdf { id: String },
    /// An earlier quick hit.
    Quickhit { id: String },
    /// An earlier roadmap.
    Roadmap { id: String },
    /// An earlier quiz.
    Quiz { id: String },
    /// An exam.
    Exam { id: String },
    /// An earlier project.
    Project { id: String },
    /// A Vidbyte project.
    VidbyteProject { id: String },
}

impl ContextItem {
    fn kind(&self) -> &'static str {
        match self {
            ContextItem::Text { .. } => "text",
            ContextItem::Doc { .. } => "doc",
            ContextItem::Pdf { .. } => "pdf",
            ContextItem::Quickhit { .. } => "quickhit",
            ContextItem::Roadmap { .. } => "roadmap",
            ContextItem::Quiz { .. } => "quiz",
            ContextItem::Exam { .. } => "exam",
            ContextItem::Project { .. } => "project",
            ContextItem::VidbyteProject { .. } => "vidbyte_project",
        }
    }
}

fn check_context(context: &[ContextItem]) -> Result<Value, Pending> {
    if context.len() > MAX_CONTEXT {
        return Err(Pending::invalid(format!(
            "context: at most {MAX_CONTEXT} items, got {}",
            context.len()
        )));
    }
    for (i, item) in context.iter().enumerate() {
        match item {
            ContextItem::Text { content, title } => {
                text(&format!("context[{i}].content"), content)?;
                if let Some(t) = title {
                    optional_text(&format!("context[{i}].title"), t)?;
                }
            }
            ContextItem::Doc { id }
            | ContextItem::Pdf { id }
            | ContextItem::Quickhit { id }
            | ContextItem::Roadmap { id }
            | ContextItem::Quiz { id }
            | ContextItem::Exam { id }
            | ContextItem::Project { id }
            | ContextItem::VidbyteProject { id } => {
                let ok = (1..=128).contains(&id.len())
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
                if !ok {
                    return Err(Pending::invalid(format!(
                        "context[{i}].id: 1–128 characters of A-Z, a-z, 0-9, `_`, `-`, `.`"
                    )));
                }
            }
        }
    }
    Ok(context.iter().map(ContextItem::kind).collect())
}

/// A required text field: not blank, at most [`MAX_TEXT`] characters.
fn text(field: &str, value: &str) -> Result<(), Pending> {
    if value.trim().is_empty() {
        return Err(Pending::invalid(format!("{field} must not be empty")));
    }
    optional_text(field, value)
}

/// An optional text field: at most [`MAX_TEXT`] characters.
fn optional_text(field: &str, value: &str) -> Result<(), Pending> {
    let n = value.chars().count();
    if n > MAX_TEXT {
        return Err(Pending::invalid(format!(
            "{field}: at most {MAX_TEXT} characters, got {n}"
        )));
    }
    Ok(())
}

fn optional_texts(fields: &[(&str, &Option<String>)]) -> Result<(), Pending> {
    for (field, value) in fields {
        if let Some(v) = value {
            optional_text(field, v)?;
        }
    }
    Ok(())
}

/// The body, checked for type and decoded, or the 415/400/413 to answer with.
fn body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, Pending> {
    let bytes =
        body.map_err(|e| Pending::error(e.status(), body_code(e.status()), e.body_text()))?;
    parse_json(headers, &bytes).map_err(|e| Pending::error(e.status, e.code, e.message))
}

/// A deterministic title from the prompt: its first words, at most 60 characters.
fn title_from(prompt: &str) -> String {
    let mut title = String::new();
    for word in prompt.split_whitespace() {
        if title.chars().count() + word.chars().count() > 60 {
            break;
        }
        if !title.is_empty() {
            title.push(' ');
        }
        title.push_str(word);
    }
    if title.is_empty() {
        prompt.chars().take(60).collect()
    } else {
        title
    }
}

/// `mode` of a quick hit.
#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Mode {
    /// A wide overview (the default).
    #[default]
    Broad,
    /// A focused deep dive.
    Narrow,
}

/// `POST /api/v1/quickhits/create`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuickhitRequest {
    prompt: String,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    context: Vec<ContextItem>,
}

/// Creates a quick hit: `prompt` required, `mode` `broad` (default) or `narrow`, `context`.
pub async fn quickhits(headers: HeaderMap, raw: Result<Bytes, BytesRejection>) -> Pending {
    let run = || -> Result<Pending, Pending> {
        let req: QuickhitRequest = body(&headers, raw)?;
        text("prompt", &req.prompt)?;
        let context = check_context(&req.context)?;
        let (mode, points) = match req.mode {
            Mode::Broad => ("broad", 5),
            Mode::Narrow => ("narrow", 3),
        };
        let title = title_from(&req.prompt);
        let data = json!({
            "type": "quickhit",
            "title": title,
            "mode": mode,
            "points": (1..=points)
                .map(|n| format!("Point {n} of {points} on “{title}” (placeholder)"))
                .collect::<Vec<_>>(),
            "context_types": context,
        });
        Ok(Pending::ok("qh", "quick hit created", data))
    };
    run().unwrap_or_else(|e| e)
}

/// `POST /api/v1/roadmaps/create`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoadmapRequest {
    prompt: String,
    #[serde(default)]
    experience: Option<Value>,
    #[serde(default = "default_timeline")]
    timeline: String,
    #[serde(default)]
    resource_preference: Option<String>,
    #[serde(default)]
    additional_info: Option<String>,
    #[serde(default)]
    context: Vec<ContextItem>,
}

fn default_timeline() -> String {
    "3 months".into()
}

/// `experience`: a string or a list of strings, as a list.
fn experience(value: Option<Value>) -> Result<Vec<String>, Pending> {
    let message = "experience must be a string or a list of strings";
    match value {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::String(s)) => {
            optional_text("experience", &s)?;
            Ok(vec![s])
        }
        Some(Value::Array(items)) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                let Value::String(s) = item else {
                    return Err(Pending::invalid(message));
                };
                optional_text(&format!("experience[{i}]"), &s)?;
                out.push(s);
            }
            Ok(out)
        }
        Some(_) => Err(Pending::invalid(message)),
    }
}

/// Creates a roadmap: `prompt` required; `experience` a string or list; `timeline`
/// (default "3 months"); `resource_preference`; `additional_info`; `context`.
pub async fn roadmaps(headers: HeaderMap, raw: Result<Bytes, BytesRejection>) -> Pending {
    let run = || -> Result<Pending, Pending> {
        let req: RoadmapRequest = body(&headers, raw)?;
        text("prompt", &req.prompt)?;
        text("timeline", &req.timeline)?;
        optional_texts(&[
            ("resource_preference", &req.resource_preference),
            ("additional_info", &req.additional_info),
        ])?;
        let experience = experience(req.experience)?;
        let context = check_context(&req.context)?;
        let title = title_from(&req.prompt);
        let stages = ["Foundations", "Practice", "Projects", "Review"];
        let data = json!({
            "type": "roadmap",
            "title": title,
            "timeline": req.timeline,
            "experience": experience,
            "resource_preference": req.resource_preference,
            "milestones": stages
                .iter()
                .enumerate()
                .map(|(i, s)| json!({
                    "step": i + 1,
                    "name": s,
                    "summary": format!("{s} for “{title}” over {} (placeholder)", req.timeline),
                }))
                .collect::<Vec<_>>(),
            "context_types": context,
        });
        Ok(Pending::ok("rm", "roadmap created", data))
    };
    run().unwrap_or_else(|e| e)
}

/// `quiz_type` of a quiz.
#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum QuizType {
    /// Questions with choices (the default).
    #[default]
    MultipleChoice,
    /// True or false statements.
    TrueFalse,
    /// Short written answers.
    ShortAnswer,
    /// A mix of the above.
    Mixed,
}

impl QuizType {
    fn as_str(self) -> &'static str {
        match self {
            QuizType::MultipleChoice => "multiple_choice",
            QuizType::TrueFalse => "true_false",
            QuizType::ShortAnswer => "short_answer",
            QuizType::Mixed => "mixed",
        }
    }
}

fn default_quiz_length() -> u32 {
    10
}

/// `POST /api/v1/quizzes/create`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuizRequest {
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    quiz_type: QuizType,
    #[serde(default)]
    reasoning_lens: Option<String>,
    #[serde(default)]
    difficulty: Option<String>,
    #[serde(default = "default_quiz_length")]
    length: u32,
    #[serde(default)]
    assessment_intent: Option<String>,
    #[serde(default)]
    explanation_length: Option<String>,
    #[serde(default)]
    question_style: Option<String>,
    #[serde(default)]
    content_focus: Option<String>,
    #[serde(default)]
    context: Vec<ContextItem>,
}

/// Creates a quiz from a `prompt`, `content` or `context` (at least one); `quiz_type`
/// `multiple_choice` (default), `true_false`, `short_answer` or `mixed`; `length` 1–50
/// (default 10); `title`, `reasoning_lens`, `difficulty`, `assessment_intent`,
/// `explanation_length`, `question_style`, `content_focus` free text.
pub async fn quizzes(headers: HeaderMap, raw: Result<Bytes, BytesRejection>) -> Pending {
    let run = || -> Result<Pending, Pending> {
        let req: QuizRequest = body(&headers, raw)?;
        let blank = |s: &Option<String>| s.as_deref().is_none_or(|s| s.trim().is_empty());
        if blank(&req.prompt) && blank(&req.content) && req.context.is_empty() {
            return Err(Pending::invalid(
                "give a prompt, content or context to build the quiz from",
            ));
        }
        optional_texts(&[
            ("title", &req.title),
            ("prompt", &req.prompt),
            ("content", &req.content),
            ("reasoning_lens", &req.reasoning_lens),
            ("difficulty", &req.difficulty),
            ("assessment_intent", &req.assessment_intent),
            ("explanation_length", &req.explanation_length),
            ("question_style", &req.question_style),
            ("content_focus", &req.content_focus),
        ])?;
        if !(1..=MAX_QUIZ_LENGTH).contains(&req.length) {
            return Err(Pending::invalid(format!(
                "length must be 1–{MAX_QUIZ_LENGTH}, got {}",
                req.length
            )));
        }
        let context = check_context(&req.context)?;
        let source = [&req.title, &req.prompt, &req.content]
            .into_iter()
            .flatten()
            .find(|s| !s.trim().is_empty())
            .map_or_else(|| "your context".to_owned(), |s| title_from(s));
        let kind = req.quiz_type.as_str();
        let questions: Vec<Value> = (1..=req.length)
            .map(|n| {
                let mut q = json!({
                    "number": n,
                    "type": kind,
                    "question": format!("Question {n} about “{source}” (placeholder)"),
                });
                if matches!(req.quiz_type, QuizType::MultipleChoice) {
                    q["choices"] = json!(["A", "B", "C", "D"]);
                    q["answer"] = json!((n - 1) % 4);
                }
                q
            })
            .collect();
        let data = json!({
            "type": "quiz",
            "title": req.title.clone().unwrap_or_else(|| source.clone()),
            "quiz_type": kind,
            "difficulty": req.difficulty,
            "length": req.length,
            "questions": questions,
            "context_types": context,
        });
        Ok(Pending::ok("quiz", "quiz created", data))
    };
    run().unwrap_or_else(|e| e)
}

/// `POST /api/v1/projects/create`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProjectRequest {
    prompt: String,
    #[serde(default)]
    context: Vec<ContextItem>,
    #[serde(default)]
    project_goal: Option<String>,
    #[serde(default)]
    why_this_matters: Option<String>,
    #[serde(default)]
    current_level: Option<String>,
    #[serde(default)]
    depth_preference: Option<String>,
    #[serde(default)]
    guidance_level: Option<String>,
}

/// Creates a project: `prompt` required; `context`, `project_goal`, `why_this_matters`,
/// `current_level`, `depth_preference`, `guidance_level`.
pub async fn projects(headers: HeaderMap, raw: Result<Bytes, BytesRejection>) -> Pending {
    let run = || -> Result<Pending, Pending> {
        let req: ProjectRequest = body(&headers, raw)?;
        text("prompt", &req.prompt)?;
        optional_texts(&[
            ("project_goal", &req.project_goal),
            ("why_this_matters", &req.why_this_matters),
            ("current_level", &req.current_level),
            ("depth_preference", &req.depth_preference),
            ("guidance_level", &req.guidance_level),
        ])?;
        let context = check_context(&req.context)?;
        let title = title_from(&req.prompt);
        let phases = ["Scope", "Build", "Test", "Present"];
        let data = json!({
            "type": "project",
            "title": title,
            "goal": req.project_goal,
            "current_level": req.current_level,
            "guidance_level": req.guidance_level,
            "phases": phases
                .iter()
                .enumerate()
                .map(|(i, p)| json!({"step": i + 1, "name": p,
                    "summary": format!("{p}: “{title}” (placeholder)")}))
                .collect::<Vec<_>>(),
            "context_types": context,
        });
        Ok(Pending::ok("proj", "project created", data))
    };
    run().unwrap_or_else(|e| e)
}
