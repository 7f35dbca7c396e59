//! Enums whose variants have stable names in the API, the store and the
//! config (`named_enum!`): one declaration gives the enum, `ALL`,
//! `as_str`, `Display`, `FromStr` with an error type of its own that lists
//! the names, and serde as those names. An unknown name is always an error,
//! never a default.

/// Declares a named enum; see the module docs.
///
/// ```
/// sluice_core::named_enum! {
///     /// A billing interval.
///     pub enum Interval / UnknownInterval ("an interval") {
///         /// Weekly.
///         Week = "week",
///         /// Monthly.
///         Month = "month",
///     }
/// }
/// assert_eq!("month".parse::<Interval>(), Ok(Interval::Month));
/// assert_eq!("day".parse::<Interval>().unwrap_err().to_string(), "\"day\" is not an interval; one of week, month");
/// assert_eq!(serde_json::to_string(&Interval::Week).unwrap(), "\"week\"");
/// ```
#[macro_export]
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident / $err:ident ($what:literal) {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: [$name; [$($text),+].len()] = [$($name::$variant),+];

            /// The stable name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        #[doc = concat!("A name that is not one of [`", stringify!($name), "::ALL`].")]
        #[derive(Debug, Clone, PartialEq, Eq)]
        $vis struct $err(pub String);

        impl ::std::fmt::Display for $err {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                write!(f, "{:?} is not {}; one of {}", self.0, $what, [$($text),+].join(", "))
            }
        }

        impl ::std::error::Error for $err {}

        impl ::std::str::FromStr for $name {
            type Err = $err;
            fn from_str(s: &str) -> ::std::result::Result<Self, $err> {
                $name::ALL.into_iter().find(|v| v.as_str() == s).ok_or_else(|| $err(s.to_owned()))
            }
        }

        impl $crate::__private::serde::Serialize for $name {
            fn serialize<S: $crate::__private::serde::Serializer>(&self, s: S) -> ::std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> $crate::__private::serde::Deserialize<'de> for $name {
            fn deserialize<D: $crate::__private::serde::Deserializer<'de>>(d: D) -> ::std::result::Result<Self, D::Error> {
                let s = <::std::borrow::Cow<'de, str> as $crate::__private::serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(<D::Error as $crate::__private::serde::de::Error>::custom)
            }
        }
    };
}

named_enum! {
    /// The order of a list (`?order=` of list endpoints that offer it).
    pub enum SortOrder / UnknownSortOrder ("an order") {
        /// Oldest first (by id, which grows with creation time).
        Asc = "asc",
        /// Newest first.
        Desc = "desc",
    }
}

/// Gives an error enum a `code()`: a stable, machine-readable
/// `<crate>.<kind>` code for each variant (logs and alerts match on it, so
/// a code is never renamed), and for each variant listed after `wraps`
/// (one field: another crate's error) that error's own code. A variant
/// left out is a compile error, so a new variant gets its code.
///
/// ```
/// #[derive(Debug)]
/// pub enum DemoError { Gone(String), Busy { why: String }, Log(sluice_core::LogError) }
/// sluice_core::error_codes!(DemoError { Gone => "demo.gone", Busy => "demo.busy" } wraps { Log });
/// assert_eq!(DemoError::Busy { why: "x".into() }.code(), "demo.busy");
/// assert_eq!(DemoError::Log(sluice_core::LogError::Closed).code(), "log.closed");
/// ```
#[macro_export]
macro_rules! error_codes {
    ($ty:ident { $($variant:ident => $code:literal),* $(,)? } $(wraps { $($wrapped:ident),* $(,)? })?) => {
        impl $ty {
            /// A stable, machine-readable code for this error (see
            /// `sluice_core::error_codes!`).
            pub fn code(&self) -> &'static str {
                match self {
                    $( $ty::$variant { .. } => $code, )*
                    $( $( $ty::$wrapped(e) => e.code(), )* )?
                }
            }
        }
    };
}
