//! A knowledge block's prefix for one model: the padded knowledge message
//! ([`cacheroute_decisions::prompt`]) and its token ids, a whole number of chunks.

use cacheroute_decisions::prompt::{
    knowledge_message_content, knowledge_prefix, padding_for, render_chat, ChatTemplate, Message,
};

use crate::tokenizer::Tokenizer;

/// The registered prefix of a block for one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixLayout {
    /// The exact content of the leading system message (preamble, text, padding).
    pub content: String,
    /// Padding units appended to the text.
    pub padding: usize,
    /// Token ids of the prefix (template head + content); `len() % chunk_size == 0`.
    pub token_ids: Vec<u32>,
}

/// Why a prefix cannot be laid out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("the knowledge prefix tokenizes to nothing")]
    Empty,
    #[error(
        "the padding unit {unit:?} does not add exactly one token per unit under this \
         model's tokenizer ({tokens} tokens after {padding} units, chunk size {chunk_size}); \
         the prefix cannot be aligned to whole chunks"
    )]
    Unalignable {
        unit: &'static str,
        tokens: usize,
        padding: usize,
        chunk_size: usize,
    },
    #[error(
        "under this model's tokenizer the rendered chat does not start with the knowledge \
         prefix's tokens (the end of the knowledge message merges with what follows it), so \
         its KV could never be reused"
    )]
    NotAPrefix,
}

fn encode(tok: &Tokenizer, template: ChatTemplate, text: &str) -> Vec<u32> {
    tok.encode_with(text, template.add_special_tokens())
}

/// Lay out `text` (already normalised) for `template`, padded so that the prefix's token
/// count is a multiple of `chunk_size`, and check that a chat rendered with the padded
/// content as its first (system) message tokenizes to ids starting with the prefix's.
pub fn layout_knowledge(
    template: ChatTemplate,
    tokenizer: &Tokenizer,
    text: &str,
    chunk_size: usize,
) -> Result<PrefixLayout, LayoutError> {
    let chunk_size = chunk_size.max(1);
    match layout_padded(template, tokenizer, text, chunk_size, 0) {
        // With no padding the text's own last character meets what follows the message
        // (byte-level BPE glues "." to "\n\n", or to a "<|" that is not a special
        // token); a whole chunk more of padding units ends the content on a unit.
        Err(LayoutError::NotAPrefix) => {
            layout_padded(template, tokenizer, text, chunk_size, chunk_size)
        }
        r => r,
    }
}

/// [`layout_knowledge`] with `extra` padding units on top of the ones that align.
fn layout_padded(
    template: ChatTemplate,
    tokenizer: &Tokenizer,
    text: &str,
    chunk_size: usize,
    extra: usize,
) -> Result<PrefixLayout, LayoutError> {
    let bare = knowledge_message_content(text, 0);
    let bare_ids = encode(tokenizer, template, &knowledge_prefix(template, &bare));
    if bare_ids.is_empty() {
        return Err(LayoutError::Empty);
    }
    let mut padding = padding_for(bare_ids.len(), chunk_size) + extra;
    let mut tries = 0;
    let (content, token_ids) = loop {
        let content = knowledge_message_content(text, padding);
        let ids = if padding == 0 {
            bare_ids.clone()
        } else {
            encode(tokenizer, template, &knowledge_prefix(template, &content))
        };
        if ids.len().is_multiple_of(chunk_size) && ids.starts_with(&bare_ids) {
            break (content, ids);
        }
        tries += 1;
        // A unit that merged added fewer tokens than units; top up once or twice, and
        // give up if the tokenizer does not behave.
        if tries >= 3 || !ids.starts_with(&bare_ids) {
            return Err(LayoutError::Unalignable {
                unit: cacheroute_decisions::prompt::PADDING_UNIT,
                tokens: ids.len(),
                padding,
                chunk_size,
            });
        }
        padding += padding_for(ids.len(), chunk_size);
    };
    let chat = render_chat(
        template,
        &[
            Message::new("system", &content),
            Message::new("user", "Why?"),
        ],
    );
    if !encode(tokenizer, template, &chat).starts_with(&token_ids) {
        return Err(LayoutError::NotAPrefix);
    }
    Ok(PrefixLayout {
        content,
        padding,
        token_ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::{render_llama3_chat, ChatMessage};
    use cacheroute_decisions::prompt::PADDING_UNIT;

    const TEXT: &str = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de \
        Mars in Paris, France. It is named after the engineer Gustave Eiffel, whose company \
        designed and built the tower from 1887 to 1889.\n\nLocally nicknamed \"La dame de fer\" \
        (French for \"Iron Lady\"), it was constructed as the centrepiece of the 1889 World's \
        Fair. 😀 Ünïcödé, tabs\tand  double  spaces; numbers 1234567 and 3.14159!";

    /// The approximation and Meta's Llama-3 tokenizer (embedded): the layout must hold
    /// under both.
    fn tokenizers() -> Vec<std::sync::Arc<Tokenizer>> {
        vec![
            std::sync::Arc::new(Tokenizer::approx(128256)),
            Tokenizer::llama3().unwrap(),
        ]
    }

    #[test]
    fn padding_unit_is_one_token_and_does_not_merge() {
        for tok in tokenizers() {
            padding_unit_case(&tok);
        }
    }

    fn padding_unit_case(tok: &Tokenizer) {
        assert_eq!(tok.encode_with(PADDING_UNIT, false).len(), 1);
        for left in ["word", "end.", "x)", "1999", "é", "\"quoted\""] {
            let base = tok.encode_with(left, false);
            for n in 1..5 {
                let padded = format!("{left}{}", PADDING_UNIT.repeat(n));
                let ids = tok.encode_with(&padded, false);
                assert_eq!(ids.len(), base.len() + n, "{padded:?}");
                assert!(ids.starts_with(&base));
                for right in ["<|eot_id|>", "\n\n", "<|im_end|>"] {
                    let ids2 = tok.encode_with(&format!("{padded}{right}"), false);
                    assert!(ids2.starts_with(&ids), "{padded:?} + {right:?}");
                }
            }
        }
    }

    #[test]
    fn prefix_is_whole_chunks_and_a_prefix_of_the_chat() {
        for tok in tokenizers() {
            whole_chunks_case(&tok);
        }
    }

    fn whole_chunks_case(tok: &Tokenizer) {
        for template in ChatTemplate::ALL {
            for chunk in [1, 16, 256] {
                for text in [TEXT, "x", "Short fact."] {
                    let l = layout_knowledge(template, tok, text, chunk).unwrap();
                    assert_eq!(l.token_ids.len() % chunk, 0, "{template} {chunk}");
                    // a whole chunk more when the text's own end would merge
                    assert!(l.padding < 2 * chunk);
                    assert!(l.content.ends_with(&PADDING_UNIT.repeat(l.padding)));
                    let prefix = knowledge_prefix(template, &l.content);
                    assert_eq!(encode(tok, template, &prefix), l.token_ids);
                }
            }
        }
    }

    #[test]
    fn text_ending_in_punctuation_gets_a_chunk_of_padding_when_aligned() {
        // Llama-3's pre-tokenizer glues "\n\n" to a trailing "." (plain layout): with
        // no padding the registered prefix would not be a prefix of the prompt
        let tok = Tokenizer::llama3().unwrap();
        let l = layout_knowledge(ChatTemplate::Plain, &tok, "Short fact.", 1).unwrap();
        assert_eq!(l.padding, 1);
        assert!(l.content.ends_with("fact. the"));
    }

    /// What the sim (and vLLM with the Llama-3 template) tokenizes for a chat request
    /// starts with the registered prefix ids.
    #[test]
    fn llama3_chat_tokens_start_with_the_registered_prefix() {
        for tok in tokenizers() {
            chat_prefix_case(&tok);
        }
    }

    fn chat_prefix_case(tok: &Tokenizer) {
        let l = layout_knowledge(ChatTemplate::Llama3, tok, TEXT, 16).unwrap();
        assert_eq!(l.token_ids[0], crate::tokenizer::BOS_ID);
        for question in [
            "What is the Eiffel Tower?",
            "\n\nwhy",
            " leading space",
            "é",
        ] {
            let ids = tok.encode_chat(&[
                ChatMessage {
                    role: "system".into(),
                    content: l.content.clone(),
                },
                ChatMessage {
                    role: "user".into(),
                    content: question.into(),
                },
            ]);
            assert!(ids.starts_with(&l.token_ids), "{question:?}");
            assert!(ids.len() > l.token_ids.len());
        }
        // the kdn rendering and filters' rendering are the same text
        let msgs = [
            ChatMessage {
                role: "system".into(),
                content: "S".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "U".into(),
            },
        ];
        assert_eq!(
            render_llama3_chat(&msgs),
            render_chat(
                ChatTemplate::Llama3,
                &[Message::new("system", "S"), Message::new("user", "U")]
            )
        );
    }
}
