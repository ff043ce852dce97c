//! Enums stored as one of a fixed set of names, where a name this build does not know is kept
//! as it was read (`Other`) and written back unchanged, never refused: readers ignore what
//! they do not understand, and a newer writer's records stay readable and copyable.
//!
//! [`stored_name_enum!`](crate::stored_name_enum) declares such an enum: the variants with
//! their stored names, `as_str`, conversions from and into `String`, `Display`, and serde as
//! the plain string (so documents and JSON output are byte-identical to a `String` field's).
//! [`name_enum!`](crate::name_enum) declares the same for names that are only ever written
//! (report fields of `--json` output): no `Other`, `as_str` is `&'static str`, and the
//! enum is `Copy`.
//! [`ChangeSource`](super::manifest::ChangeSource) and
//! [`ContainerFormat`](super::manifest::ContainerFormat) follow the same rules by hand
//! because their names carry data.

/// Declares an enum stored as a name; see the [module documentation](self).
///
/// ```ignore
/// stored_name_enum! {
///     /// Doc of the enum.
///     pub enum Outcome {
///         /// Doc of the variant.
///         Ok => "ok",
///         Damaged => "damaged",
///     }
/// }
/// ```
#[macro_export]
macro_rules! stored_name_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $stored:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(from = "String", into = "String")]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
            /// A name this build does not know, kept as read.
            Other(String),
        }

        impl $name {
            /// The stored name.
            pub fn as_str(&self) -> &str {
                match self {
                    $( $name::$variant => $stored, )+
                    $name::Other(s) => s,
                }
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                match s.as_str() {
                    $( $stored => $name::$variant, )+
                    _ => $name::Other(s),
                }
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name::from(s.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> Self {
                match v {
                    $name::Other(s) => s,
                    known => known.as_str().to_owned(),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }
    };
}

/// Declares an enum written as one of a fixed set of names (report fields); see the
/// [module documentation](self). Same syntax as [`stored_name_enum!`](crate::stored_name_enum).
#[macro_export]
macro_rules! name_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $stored:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $stored)] $variant, )+
        }

        impl $name {
            /// The name written in reports.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $stored, )+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }
    };
}

#[cfg(test)]
mod tests {
    crate::stored_name_enum! {
        /// A test enum.
        pub enum Colour {
            Red => "red",
            DarkBlue => "dark-blue",
        }
    }

    #[test]
    fn known_and_unknown_names_round_trip() -> serde_json::Result<()> {
        for (stored, want) in [
            ("red", Colour::Red),
            ("dark-blue", Colour::DarkBlue),
            ("ultraviolet", Colour::Other("ultraviolet".into())),
        ] {
            let json = serde_json::to_string(stored)?;
            let read: Colour = serde_json::from_str(&json)?;
            assert_eq!(read, want);
            assert_eq!(serde_json::to_string(&read)?, json);
            assert_eq!(read.to_string(), stored);
        }
        Ok(())
    }

    crate::name_enum! {
        /// A test enum of report names.
        pub enum Shape {
            Square => "square",
            RoundedBox => "rounded-box",
        }
    }

    #[test]
    fn report_names_serialise_as_their_name() -> serde_json::Result<()> {
        assert_eq!(
            serde_json::to_string(&Shape::RoundedBox)?,
            "\"rounded-box\""
        );
        assert_eq!(format!("{:>7}", Shape::Square), " square");
        Ok(())
    }
}
