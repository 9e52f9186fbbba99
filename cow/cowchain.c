/* main() of the command line tool `cowchain`. (Being written.) */
#include <config.h>

#include <stdio.h>

int
main (int argc, char **argv)
{
  fprintf (stderr, "cowchain: no commands yet\n");
  return 1;
}
